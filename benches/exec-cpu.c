/*
 * exec-cpu: CPU time from exec to exit of one-shot servers, measured side by side.
 *
 * usage: exec-cpu RUNS REQUEST CMD [ARG]... [-- CMD [ARG]...]...
 * Runs each command RUNS times, in turn (A B A B ..., so drift in the machine's speed hits
 * all alike), each with stdin open on the file REQUEST and stdout on /dev/null, and prints
 * per command the median and mean CPU time (user + system, from wait4) and wall time of
 * one run, and how many runs did not exit 0. The environment is passed on unchanged, so
 * PROTO=TCP TCPREMOTEIP=127.0.0.1 can name the client.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXCMDS 8

extern char **environ;

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static double now_us(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

int main(int argc, char **argv)
{
	char **cmds[MAXCMDS];
	int ncmds = 0, runs, failed[MAXCMDS] = { 0 };
	double *cpu[MAXCMDS], *wall[MAXCMDS];

	if (argc < 4) {
		fprintf(stderr, "usage: exec-cpu RUNS REQUEST CMD [ARG]... [-- CMD [ARG]...]...\n");
		return 2;
	}
	runs = atoi(argv[1]);
	if (runs < 1)
		return 2;
	cmds[ncmds++] = argv + 3;
	for (int i = 3; i < argc; i++) {
		if (strcmp(argv[i], "--") == 0) {
			argv[i] = NULL;
			if (i + 1 < argc && ncmds < MAXCMDS)
				cmds[ncmds++] = argv + i + 1;
		}
	}
	for (int c = 0; c < ncmds; c++) {
		cpu[c] = calloc((size_t)runs, sizeof(double));
		wall[c] = calloc((size_t)runs, sizeof(double));
		if (cpu[c] == NULL || wall[c] == NULL)
			return 1;
	}

	for (int r = 0; r < runs; r++) {
		for (int c = 0; c < ncmds; c++) {
			posix_spawn_file_actions_t fa;
			struct rusage ru;
			int status;
			pid_t pid;
			double t0;

			posix_spawn_file_actions_init(&fa);
			posix_spawn_file_actions_addopen(&fa, 0, argv[2], O_RDONLY, 0);
			posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
			t0 = now_us();
			if (posix_spawn(&pid, cmds[c][0], &fa, NULL, cmds[c], environ) != 0) {
				perror(cmds[c][0]);
				return 1;
			}
			posix_spawn_file_actions_destroy(&fa);
			if (wait4(pid, &status, 0, &ru) != pid)
				return 1;
			wall[c][r] = now_us() - t0;
			cpu[c][r] = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e6 +
				    (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
			if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
				failed[c]++;
		}
	}

	printf("%-10s %-10s %-10s %-10s %-7s %s\n", "cpu med", "cpu mean", "wall med", "wall mean",
	       "failed", "command");
	for (int c = 0; c < ncmds; c++) {
		double cs = 0, ws = 0;

		for (int r = 0; r < runs; r++) {
			cs += cpu[c][r];
			ws += wall[c][r];
		}
		qsort(cpu[c], (size_t)runs, sizeof(double), cmp_double);
		qsort(wall[c], (size_t)runs, sizeof(double), cmp_double);
		printf("%-10.0f %-10.0f %-10.0f %-10.0f %-7d", cpu[c][runs / 2], cs / runs,
		       wall[c][runs / 2], ws / runs, failed[c]);
		for (char **a = cmds[c]; *a != NULL; a++)
			printf(" %s", *a);
		printf("\n");
	}
	return 0;
}
