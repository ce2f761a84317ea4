// Writes a block to FILE through io_uring (IORING_OP_WRITE), reads it back
// (IORING_OP_READ) and compares. Raw system calls, no liburing.
// Exit 0: both completed and matched; 1: a wrong result; 2: io_uring is unavailable
// (the kernel lacks CONFIG_IO_URING) or FILE cannot be opened.
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

struct ring {
    int fd;
    unsigned *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
};

static int setup(struct ring *r) {
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    r->fd = (int)syscall(__NR_io_uring_setup, 4, &p);
    if (r->fd < 0) {
        printf("io_uring: io_uring_setup failed: %s\n", strerror(errno));
        return -1;
    }
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    char *sq = mmap(NULL, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                    IORING_OFF_SQ_RING);
    char *cq = mmap(NULL, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                    IORING_OFF_CQ_RING);
    r->sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || r->sqes == MAP_FAILED) {
        printf("io_uring: mapping the rings failed: %s\n", strerror(errno));
        return -1;
    }
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    return 0;
}

// Submits one read or write of len bytes at offset 0 and returns its result.
static int submit(struct ring *r, int op, int fd, char *buf, unsigned len) {
    unsigned tail = *r->sq_tail;
    unsigned index = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = &r->sqes[index];
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = (unsigned char)op;
    sqe->fd = fd;
    sqe->addr = (unsigned long)buf;
    sqe->len = len;
    sqe->off = 0;
    r->sq_array[index] = index;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    if (syscall(__NR_io_uring_enter, r->fd, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0) {
        printf("io_uring: io_uring_enter failed: %s\n", strerror(errno));
        return -1000;
    }
    unsigned head = *r->cq_head;
    if (head == __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) {
        printf("io_uring: no completion after io_uring_enter\n");
        return -1000;
    }
    int res = r->cqes[head & *r->cq_mask].res;
    __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
    return res;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        printf("usage: io-uring-rw FILE\n");
        return 2;
    }
    struct ring r;
    if (setup(&r) != 0)
        return 2;
    int fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) {
        printf("io_uring: open %s: %s\n", argv[1], strerror(errno));
        return 2;
    }
    static char out[4096], in[4096];
    for (unsigned i = 0; i < sizeof(out); i++)
        out[i] = (char)('a' + i % 26);
    int wrote = submit(&r, IORING_OP_WRITE, fd, out, sizeof(out));
    if (wrote != (int)sizeof(out)) {
        printf("io_uring: write completed with %d\n", wrote);
        return 1;
    }
    int got = submit(&r, IORING_OP_READ, fd, in, sizeof(in));
    if (got != (int)sizeof(in) || memcmp(in, out, sizeof(in)) != 0) {
        printf("io_uring: read back %d bytes that do not match\n", got);
        return 1;
    }
    printf("io_uring: wrote and read back %d bytes\n", got);
    return 0;
}
