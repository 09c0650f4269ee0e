/* faultfs: libfuse3 passthrough of SRC_DIR with injectable storage faults.
 * usage: faultfs SRC_DIR MODEFILE MOUNTPOINT [fuse opts, e.g. -f -o allow_other]
 * MODEFILE holds one of: ok | hang | eio | slow:<ms>   (re-read on every op)
 *   hang : data ops (read/write/fsync/open/getattr) block until mode changes
 *   eio  : data ops fail with EIO
 *   slow : data ops sleep <ms> first */
#define FUSE_USE_VERSION 31
#define _GNU_SOURCE
#include <fuse.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <errno.h>
#include <dirent.h>
#include <time.h>
#include <sys/stat.h>
#include <sys/statvfs.h>

static char src[4096], modefile[4096];

static void mode_read(char *buf, size_t n) {
    int fd = open(modefile, O_RDONLY); buf[0] = 0;
    if (fd >= 0) { ssize_t r = read(fd, buf, n - 1); buf[r > 0 ? r : 0] = 0; close(fd); }
    buf[strcspn(buf, "\n")] = 0;
}
/* returns 0 to proceed or -EIO */
static int fault(const char *op) {
    char m[64];
    for (;;) {
        mode_read(m, sizeof m);
        if (!strcmp(m, "hang")) { usleep(50000); continue; }
        if (!strcmp(m, "eio")) return -EIO;
        if (!strncmp(m, "slow:", 5)) usleep(atoi(m + 5) * 1000);
        (void)op; return 0;
    }
}
static void full(char *out, const char *p) { snprintf(out, 4096, "%s%s", src, p); }

static int f_getattr(const char *p, struct stat *st, struct fuse_file_info *fi) {
    (void)fi; char f[4096]; full(f, p);
    if (strcmp(p, "/")) { int e = fault("getattr"); if (e) return e; }
    return lstat(f, st) ? -errno : 0;
}
static int f_readdir(const char *p, void *buf, fuse_fill_dir_t fill, off_t off,
                     struct fuse_file_info *fi, enum fuse_readdir_flags fl) {
    (void)off; (void)fi; (void)fl; char f[4096]; full(f, p);
    DIR *d = opendir(f); if (!d) return -errno;
    struct dirent *de;
    while ((de = readdir(d))) fill(buf, de->d_name, NULL, 0, 0);
    closedir(d); return 0;
}
static int f_open(const char *p, struct fuse_file_info *fi) {
    char f[4096]; full(f, p); int e = fault("open"); if (e) return e;
    int fd = open(f, fi->flags & ~O_DIRECT); if (fd < 0) return -errno;
    fi->fh = fd; fi->direct_io = 1; return 0;
}
static int f_create(const char *p, mode_t m, struct fuse_file_info *fi) {
    char f[4096]; full(f, p); int e = fault("create"); if (e) return e;
    int fd = open(f, (fi->flags & ~O_DIRECT) | O_CREAT, m); if (fd < 0) return -errno;
    fi->fh = fd; fi->direct_io = 1; return 0;
}
static int f_read(const char *p, char *b, size_t n, off_t o, struct fuse_file_info *fi) {
    (void)p; int e = fault("read"); if (e) return e;
    ssize_t r = pread(fi->fh, b, n, o); return r < 0 ? -errno : (int)r;
}
static int f_write(const char *p, const char *b, size_t n, off_t o, struct fuse_file_info *fi) {
    (void)p; int e = fault("write"); if (e) return e;
    ssize_t r = pwrite(fi->fh, b, n, o); return r < 0 ? -errno : (int)r;
}
static int f_fsync(const char *p, int ds, struct fuse_file_info *fi) {
    (void)p; int e = fault("fsync"); if (e) return e;
    return (ds ? fdatasync(fi->fh) : fsync(fi->fh)) ? -errno : 0;
}
static int f_release(const char *p, struct fuse_file_info *fi) { (void)p; close(fi->fh); return 0; }
static int f_truncate(const char *p, off_t sz, struct fuse_file_info *fi) {
    char f[4096]; full(f, p); int e = fault("truncate"); if (e) return e;
    return (fi ? ftruncate(fi->fh, sz) : truncate(f, sz)) ? -errno : 0;
}
static int f_statfs(const char *p, struct statvfs *s) { (void)p; return statvfs(src, s) ? -errno : 0; }
static int f_chown(const char *p, uid_t u, gid_t g, struct fuse_file_info *fi) {
    (void)fi; char f[4096]; full(f, p); return lchown(f, u, g) ? -errno : 0;
}
static int f_chmod(const char *p, mode_t m, struct fuse_file_info *fi) {
    (void)fi; char f[4096]; full(f, p); return chmod(f, m) ? -errno : 0;
}
static int f_access(const char *p, int m) { char f[4096]; full(f, p); return access(f, m) ? -errno : 0; }

static const struct fuse_operations ops = {
    .getattr = f_getattr, .readdir = f_readdir, .open = f_open, .create = f_create,
    .read = f_read, .write = f_write, .fsync = f_fsync, .release = f_release,
    .truncate = f_truncate, .statfs = f_statfs, .chown = f_chown, .chmod = f_chmod,
    .access = f_access,
};

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: %s SRC MODEFILE MNT [fuse opts]\n", argv[0]); return 2; }
    if (!realpath(argv[1], src) || !realpath(argv[2], modefile)) { perror("realpath"); return 2; }
    argv[2] = argv[0];           /* fuse_main sees: prog MNT opts... */
    return fuse_main(argc - 2, argv + 2, &ops, NULL);
}
