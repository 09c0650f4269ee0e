/* Test-only FUSE passthrough for Ferry's storage-fault tests (never used on real hosts).
 *
 * usage: faultfs BACKING_DIR MODE_FILE MOUNTPOINT [fuse options]
 *
 * Mirrors BACKING_DIR at MOUNTPOINT. Before every operation it reads MODE_FILE:
 *   ok        pass the operation on
 *   hang      block until the mode changes (storage that stopped answering)
 *   eio       fail with EIO (storage returning errors)
 *   slow:MS   wait MS milliseconds, then pass it on
 * Files opened with O_DIRECT (sanlock's lease I/O) are opened without it on the backing
 * directory and served with FUSE's direct_io, so no page cache hides the faults. */
#define FUSE_USE_VERSION 31
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/time.h>
#include <unistd.h>

static const char *backing;
static const char *mode_file;

/* Waits or fails according to the mode file: 0 to go on, or a negative errno. */
static int gate(void)
{
	for (;;) {
		char mode[64] = "ok";
		FILE *f = fopen(mode_file, "r");

		if (f) {
			if (!fgets(mode, sizeof(mode), f))
				strcpy(mode, "ok");
			fclose(f);
		}
		mode[strcspn(mode, "\r\n")] = 0;
		if (strcmp(mode, "hang") == 0) {
			usleep(50 * 1000);
			continue;
		}
		if (strcmp(mode, "eio") == 0)
			return -EIO;
		if (strncmp(mode, "slow:", 5) == 0)
			usleep((useconds_t)atoi(mode + 5) * 1000);
		return 0;
	}
}

static void real(char *out, const char *path)
{
	snprintf(out, PATH_MAX, "%s%s", backing, path);
}

/* Runs `call` (a system call returning -1 and errno on failure) behind the gate. */
#define GATED(call)                        \
	do {                               \
		int g_ = gate();           \
		if (g_)                    \
			return g_;         \
		if ((call) == -1)          \
			return -errno;     \
		return 0;                  \
	} while (0)

static int ff_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
	char p[PATH_MAX];

	real(p, path);
	if (fi)
		GATED(fstat((int)fi->fh, st));
	GATED(lstat(p, st));
}

static int ff_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
		      struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
	char p[PATH_MAX];
	DIR *d;
	struct dirent *e;
	int g = gate();

	(void)off;
	(void)fi;
	(void)flags;
	if (g)
		return g;
	real(p, path);
	d = opendir(p);
	if (!d)
		return -errno;
	while ((e = readdir(d)))
		fill(buf, e->d_name, NULL, 0, 0);
	closedir(d);
	return 0;
}

static int ff_mkdir(const char *path, mode_t mode)
{
	char p[PATH_MAX];

	real(p, path);
	GATED(mkdir(p, mode));
}

static int ff_unlink(const char *path)
{
	char p[PATH_MAX];

	real(p, path);
	GATED(unlink(p));
}

static int ff_rmdir(const char *path)
{
	char p[PATH_MAX];

	real(p, path);
	GATED(rmdir(p));
}

static int ff_rename(const char *from, const char *to, unsigned int flags)
{
	char a[PATH_MAX], b[PATH_MAX];

	real(a, from);
	real(b, to);
	GATED(renameat2(AT_FDCWD, a, AT_FDCWD, b, flags));
}

static int ff_link(const char *from, const char *to)
{
	char a[PATH_MAX], b[PATH_MAX];

	real(a, from);
	real(b, to);
	GATED(link(a, b));
}

static int ff_chmod(const char *path, mode_t mode, struct fuse_file_info *fi)
{
	char p[PATH_MAX];

	(void)fi;
	real(p, path);
	GATED(chmod(p, mode));
}

static int ff_chown(const char *path, uid_t uid, gid_t gid, struct fuse_file_info *fi)
{
	char p[PATH_MAX];

	(void)fi;
	real(p, path);
	GATED(lchown(p, uid, gid));
}

static int ff_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
	char p[PATH_MAX];

	real(p, path);
	if (fi)
		GATED(ftruncate((int)fi->fh, size));
	GATED(truncate(p, size));
}

static int ff_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi)
{
	char p[PATH_MAX];

	(void)fi;
	real(p, path);
	GATED(utimensat(AT_FDCWD, p, tv, AT_SYMLINK_NOFOLLOW));
}

static int opened(const char *path, struct fuse_file_info *fi, int fd)
{
	(void)path;
	if (fd == -1)
		return -errno;
	fi->fh = (uint64_t)fd;
	if (fi->flags & O_DIRECT)
		fi->direct_io = 1;
	return 0;
}

static int ff_create(const char *path, mode_t mode, struct fuse_file_info *fi)
{
	char p[PATH_MAX];
	int g = gate();

	if (g)
		return g;
	real(p, path);
	return opened(path, fi, open(p, fi->flags & ~O_DIRECT, mode));
}

static int ff_open(const char *path, struct fuse_file_info *fi)
{
	char p[PATH_MAX];
	int g = gate();

	if (g)
		return g;
	real(p, path);
	return opened(path, fi, open(p, fi->flags & ~O_DIRECT));
}

static int ff_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
	ssize_t n;
	int g = gate();

	(void)path;
	if (g)
		return g;
	n = pread((int)fi->fh, buf, size, off);
	return n == -1 ? -errno : (int)n;
}

static int ff_write(const char *path, const char *buf, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	ssize_t n;
	int g = gate();

	(void)path;
	if (g)
		return g;
	n = pwrite((int)fi->fh, buf, size, off);
	return n == -1 ? -errno : (int)n;
}

static int ff_statfs(const char *path, struct statvfs *st)
{
	char p[PATH_MAX];

	real(p, path);
	GATED(statvfs(p, st));
}

static int ff_release(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	close((int)fi->fh);
	return 0;
}

static int ff_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
	(void)path;
	GATED(datasync ? fdatasync((int)fi->fh) : fsync((int)fi->fh));
}

static int ff_fsyncdir(const char *path, int datasync, struct fuse_file_info *fi)
{
	(void)path;
	(void)datasync;
	(void)fi;
	return gate();
}

static const struct fuse_operations ops = {
	.getattr = ff_getattr,
	.readdir = ff_readdir,
	.mkdir = ff_mkdir,
	.unlink = ff_unlink,
	.rmdir = ff_rmdir,
	.rename = ff_rename,
	.link = ff_link,
	.chmod = ff_chmod,
	.chown = ff_chown,
	.truncate = ff_truncate,
	.utimens = ff_utimens,
	.create = ff_create,
	.open = ff_open,
	.read = ff_read,
	.write = ff_write,
	.statfs = ff_statfs,
	.release = ff_release,
	.fsync = ff_fsync,
	.fsyncdir = ff_fsyncdir,
};

int main(int argc, char *argv[])
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s BACKING_DIR MODE_FILE MOUNTPOINT [fuse options]\n", argv[0]);
		return 2;
	}
	backing = realpath(argv[1], NULL);
	mode_file = realpath(argv[2], NULL);
	if (!backing || !mode_file) {
		perror("realpath");
		return 2;
	}
	/* fuse_main sees: program, mountpoint and the options after it. */
	argv[2] = argv[0];
	return fuse_main(argc - 2, argv + 2, &ops, NULL);
}
