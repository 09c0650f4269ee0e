/* lvb: acquire with SANLK_ACQUIRE_LVB, read the 512-byte lock value block,
 * bump a "generation" stored in it, write it back, release. Shows a per-lease
 * record (e.g. Ferry's VM generation) living inside the lease area. */
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sanlock.h>
#include <sanlock_resource.h>
int main(int argc, char **argv) {
    struct sanlk_resource *res; char lvb[512];
    if (argc < 2 || sanlock_str_to_res(argv[1], &res)) return 2;
    int sock = sanlock_register();
    int rv = sanlock_acquire(sock, -1, SANLK_ACQUIRE_LVB, 1, &res, NULL);
    printf("acquire(LVB) rv=%d\n", rv); if (rv) return 1;
    memset(lvb, 0, sizeof lvb);
    rv = sanlock_get_lvb(0, res, lvb, sizeof lvb);
    unsigned long gen = 0; sscanf(lvb, "ferry-gen=%lu", &gen);
    printf("get_lvb rv=%d content='%s' -> gen %lu\n", rv, lvb, gen);
    snprintf(lvb, sizeof lvb, "ferry-gen=%lu", gen + 1);
    rv = sanlock_set_lvb(0, res, lvb, sizeof lvb);
    printf("set_lvb rv=%d content='%s'\n", rv, lvb);
    rv = sanlock_release(sock, -1, 0, 1, &res);
    printf("release rv=%d\n", rv);
    return 0;
}
