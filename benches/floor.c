/*
 * floor: the least work a one-process-per-connection QMQP server must do for one message,
 * so the benchmark can show how close qmqpd comes to the floor of its own design.
 *
 * Run per connection under tcpserver:  tcpserver ... floor QUEUEDIR
 * It reads one QMQP request from fd 0 (outer netstring "N:" + N bytes + ","), stores the N
 * bytes unparsed in QUEUEDIR/tmp/NAME, fsyncs the file, renames it into QUEUEDIR/new/NAME,
 * fsyncs new/, and only then writes "K" on fd 1. No access check, no envelope parsing, no
 * header, no logging. Any failure is answered with Z (or nothing, if the request was not
 * readable) and exit 111.
 *
 * Built static (gcc -O2 -static) so exec costs what the smallest real program costs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <unistd.h>

#define BUFSIZE 65536

static char buf[BUFSIZE];

static int write_all(int fd, const char *p, size_t n);

static void fail(void)
{
	write_all(1, "11:Zfloor fail,", 15);
	_exit(111);
}

/* Writes all of p[0..n) to fd; 0 on success. */
static int write_all(int fd, const char *p, size_t n)
{
	ssize_t w;

	while (n > 0) {
		w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

/* One read(2) into buf, retried on EINTR; <= 0 on EOF or error. */
static ssize_t read_some(size_t want)
{
	ssize_t n;

	do
		n = read(0, buf, want);
	while (n < 0 && errno == EINTR);
	return n;
}

int main(int argc, char **argv)
{
	unsigned long long len = 0;	/* message bytes not yet stored */
	int digits = 0, fd, dirfd, comma = 0;
	char name[96], tmp[128], new[128];
	struct timeval tv;
	size_t pos = 0, have, take;
	ssize_t n;

	if (argc != 2 || chdir(argv[1]) != 0)
		fail();

	/* The first read normally holds the outer length and, for small messages, all the rest. */
	n = read_some(BUFSIZE);
	if (n <= 0)
		_exit(100);
	have = (size_t)n;
	for (;; pos++) {
		if (pos == have)
			_exit(100);	/* a length split over reads: not worth handling here */
		if (buf[pos] == ':')
			break;
		if (buf[pos] < '0' || buf[pos] > '9' || ++digits > 19)
			_exit(100);
		len = len * 10 + (unsigned long long)(buf[pos] - '0');
	}
	if (digits == 0)
		_exit(100);
	pos++;

	gettimeofday(&tv, NULL);
	snprintf(name, sizeof name, "%lld.%06ld.%d", (long long)tv.tv_sec, (long)tv.tv_usec,
		 (int)getpid());
	snprintf(tmp, sizeof tmp, "tmp/%s", name);
	snprintf(new, sizeof new, "new/%s", name);
	fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0)
		fail();

	/* Store the N bytes; the closing comma is checked, not stored. */
	for (;;) {
		take = have - pos;
		if ((unsigned long long)take > len)
			take = (size_t)len;
		if (take > 0 && write_all(fd, buf + pos, take) != 0) {
			unlink(tmp);
			fail();
		}
		len -= take;
		pos += take;
		if (len == 0 && pos < have) {
			comma = buf[pos] == ',';
			break;
		}
		n = read_some(len > 0 && len < BUFSIZE ? (size_t)len + 1 : BUFSIZE);
		if (n <= 0) {
			unlink(tmp);
			_exit(100);
		}
		have = (size_t)n;
		pos = 0;
	}
	if (!comma) {
		unlink(tmp);
		_exit(100);
	}

	if (fsync(fd) != 0 || close(fd) != 0 || rename(tmp, new) != 0) {
		unlink(tmp);
		fail();
	}
	dirfd = open("new", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dirfd < 0 || fsync(dirfd) != 0)
		fail();
	close(dirfd);
	if (write_all(1, "3:Kok,", 6) != 0)
		_exit(111);
	return 0;
}
