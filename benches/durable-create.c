/*
 * durable-create: how many files per second this disk can make durable, with no network and
 * no process start-up: the ceiling under every server in the benchmark.
 *
 * usage: durable-create DIR WRITERS SECONDS SIZE
 * DIR/tmp and DIR/new must exist. WRITERS processes each create files for SECONDS seconds
 * with the floor responder's sequence: create DIR/tmp/NAME, write SIZE bytes, fsync, close,
 * rename into DIR/new/NAME, fsync DIR/new. Prints "FILES SECONDS" (files made, time taken) on
 * stdout; exit 1 on any failure.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double seconds(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* One writer: makes files until `until`; the count goes back as the exit status of a pipe
 * write, so the parent can add them up. */
static int write_files(int writer, double until, size_t size, int out)
{
	char tmp[64], new[64];
	char *data = malloc(size + 1);
	int fd, dirfd;

	if (data == NULL)
		return 1;
	memset(data, 'x', size);
	dirfd = open("new", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dirfd < 0)
		return 1;
	long i;
	for (i = 0; seconds() < until; i++) {
		snprintf(tmp, sizeof tmp, "tmp/w%d.%ld", writer, i);
		snprintf(new, sizeof new, "new/w%d.%ld", writer, i);
		fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
		if (fd < 0)
			return 1;
		if (write(fd, data, size) != (ssize_t)size || fsync(fd) != 0 || close(fd) != 0)
			return 1;
		if (rename(tmp, new) != 0 || fsync(dirfd) != 0)
			return 1;
	}
	return write(out, &i, sizeof i) == (ssize_t)sizeof i ? 0 : 1;
}

int main(int argc, char **argv)
{
	int writers, status, failed = 0, fds[2];
	long files = 0, n;
	double limit, t0, t1;
	size_t size;

	if (argc != 5 || chdir(argv[1]) != 0) {
		fprintf(stderr, "usage: durable-create DIR WRITERS SECONDS SIZE\n");
		return 1;
	}
	writers = atoi(argv[2]);
	limit = atof(argv[3]);
	size = (size_t)atol(argv[4]);
	if (writers < 1 || writers > 1000 || limit <= 0 || pipe(fds) != 0) {
		fprintf(stderr, "durable-create: bad WRITERS or SECONDS\n");
		return 1;
	}

	t0 = seconds();
	for (int w = 0; w < writers; w++) {
		pid_t pid = fork();
		if (pid < 0)
			return 1;
		if (pid == 0)
			_exit(write_files(w, t0 + limit, size, fds[1]));
	}
	close(fds[1]);
	for (int w = 0; w < writers; w++) {
		if (wait(&status) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
			failed = 1;
	}
	t1 = seconds();
	while (read(fds[0], &n, sizeof n) == (ssize_t)sizeof n)
		files += n;
	if (failed) {
		fprintf(stderr, "durable-create: a writer failed\n");
		return 1;
	}
	printf("%ld %.6f\n", files, t1 - t0);
	return 0;
}
