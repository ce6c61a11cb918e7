/*
 * exitrss: runs a command and records its peak resident set size (VmHWM) at the moment it
 * exits, while its memory still exists, for one-shot servers that live only for one
 * connection. (getrusage's ru_maxrss of a child also counts the parent's memory copied
 * at fork, so it is not used.)
 *
 * usage: exitrss LOGFILE COMMAND [ARG]...
 * Starts COMMAND under ptrace with PTRACE_O_TRACEEXIT; when its main thread stops at exit,
 * appends "PID VMHWM_KB" to LOGFILE. fds 0 and 1 are handed to COMMAND and closed here, so
 * the connection ends when COMMAND ends. Exits with COMMAND's status.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

static long vmhwm_kb(pid_t pid)
{
	char path[64], line[256];
	long kb = -1;
	FILE *f;

	snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
	f = fopen(path, "r");
	if (f == NULL)
		return -1;
	while (fgets(line, sizeof line, f) != NULL) {
		if (strncmp(line, "VmHWM:", 6) == 0) {
			kb = atol(line + 6);
			break;
		}
	}
	fclose(f);
	return kb;
}

int main(int argc, char **argv)
{
	int status, sig;
	pid_t pid;
	FILE *log;

	if (argc < 3) {
		fprintf(stderr, "usage: exitrss LOGFILE COMMAND [ARG]...\n");
		return 111;
	}
	pid = fork();
	if (pid < 0)
		return 111;
	if (pid == 0) {
		if (ptrace(PTRACE_TRACEME, 0, NULL, NULL) != 0)
			_exit(111);
		execvp(argv[2], argv + 2);
		_exit(127);
	}
	close(0);
	close(1);
	/* The child stops with SIGTRAP after its exec. */
	if (waitpid(pid, &status, 0) != pid || !WIFSTOPPED(status))
		return 111;
	ptrace(PTRACE_SETOPTIONS, pid, NULL,
	       (void *)(long)(PTRACE_O_TRACEEXIT | PTRACE_O_EXITKILL));
	ptrace(PTRACE_CONT, pid, NULL, NULL);
	for (;;) {
		if (waitpid(pid, &status, __WALL) != pid)
			return 111;
		if (WIFEXITED(status))
			return WEXITSTATUS(status);
		if (WIFSIGNALED(status))
			return 128 + WTERMSIG(status);
		if (!WIFSTOPPED(status))
			continue;
		sig = WSTOPSIG(status);
		if (sig == SIGTRAP && (status >> 16) == PTRACE_EVENT_EXIT) {
			log = fopen(argv[1], "a");
			if (log != NULL) {
				fprintf(log, "%d %ld\n", (int)pid, vmhwm_kb(pid));
				fclose(log);
			}
			sig = 0;
		}
		ptrace(PTRACE_CONT, pid, NULL, (void *)(long)sig);
	}
}
