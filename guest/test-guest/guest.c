/*
 * microagent test guest: a freestanding program that microagent-vmm boots like a
 * kernel (64-bit Linux boot protocol, boot parameters in RSI). It runs without
 * interrupts, exceptions or SSE, so it works even where guest kernel code is
 * instruction-emulated (PVM hosts). Scenarios are chosen on the command line:
 *
 *   scenario=banner   print the command line, then reset through the i8042
 *   scenario=blk      drive the first virtio-mmio block device by polling: write
 *                     blk_pattern= at sector blk_sector=, read it back, reset
 *   scenario=vsock    connect to host port vsock_port= through the virtio-mmio vsock
 *                     device, send vsock_msg=, print what comes back, reset
 *   scenario=blk_snapshot  write blk_pattern= at blk_sector=, print BLK-WRITTEN, print
 *                     "wait N" blk_wait= times (time for a snapshot), read the
 *                     sector back, reset
 *   scenario=vsock_snapshot  set up vsock, post an event buffer, print VSOCK-READY,
 *                     wait for an event (a restore's TRANSPORT_RESET), print it, then
 *                     connect and echo as scenario=vsock
 *   scenario=net      drive the virtio-mmio net device by polling: ARP for the
 *                     gateway 10.0.2.2 from 10.0.2.15, print NET-ARP=<its mac>, send
 *                     it an ICMP echo request, print NET-PING=ok when the matching
 *                     reply comes back; with net_udp=IP:PORT, send a UDP datagram
 *                     there and print NET-UDP=<the reply's payload>; reset
 *   scenario=blk_loop  write sector blk_sector=+N for N = 0, 1, ... (up to 4096), each
 *                     holding "blkloop N", printing "blk-io N status=S" as each completes;
 *                     when the device says it needs a reset (its daemon died) print
 *                     BLK-ERROR and halt
 *   scenario=counter  print "tick N" forever (for pause/resume)
 *   scenario=smp      start smp_aps= application processors (INIT/SIPI), each counts
 *                     in its own slot; print "tick N ap0=.. ap1=.." forever
 *   scenario=halt     print the banner, then cli; hlt forever
 *   scenario=reset_then_print  ask the i8042 for a reset, then print AFTER-RESET
 *                     forever (a VMM must not run a vCPU on after its reset request)
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__asm__(".globl _start\n"
        "_start:\n"
        "  mov %rsi, %rdi\n"
        "  call guest_main\n"
        "1: cli\n"
        "  hlt\n"
        "  jmp 1b\n");

/* Application processors: the SIPI trampoline (copied to 0x10000, entered in real
 * mode at CS=0x1000) loads the VMM's boot GDT (0x500: 0x8 is 64-bit code, 0x10 data),
 * turns on PAE, the boot page tables (CR3 0x9000), long mode and paging, and jumps to
 * ap_entry64, which takes an index and a stack and calls ap_main. */
__asm__(".globl tramp_start, tramp_end\n"
        ".code16\n"
        "tramp_start:\n"
        "  cli\n"
        "  mov %cs, %ax\n"
        "  mov %ax, %ds\n"
        "  lgdtl tramp_gdtp - tramp_start\n"
        "  mov %cr4, %eax\n"
        "  or $0x20, %eax\n"
        "  mov %eax, %cr4\n"
        "  mov $0x9000, %eax\n"
        "  mov %eax, %cr3\n"
        "  mov $0xc0000080, %ecx\n"
        "  rdmsr\n"
        "  or $0x100, %eax\n"
        "  wrmsr\n"
        "  mov %cr0, %eax\n"
        "  or $0x80000001, %eax\n"
        "  mov %eax, %cr0\n"
        "  ljmpl $0x8, $ap_entry64\n"
        "tramp_gdtp:\n"
        "  .word 0x1f\n"
        "  .long 0x500\n"
        "tramp_end:\n"
        ".code64\n"
        ".globl ap_entry64\n"
        "ap_entry64:\n"
        "  mov $0x10, %ax\n"
        "  mov %ax, %ds\n"
        "  mov %ax, %es\n"
        "  mov %ax, %ss\n"
        "  mov $1, %eax\n"
        "  lock xadd %eax, ap_count(%rip)\n"
        "  mov %eax, %edi\n"
        "  lea 1(%rax), %rsp\n"
        "  shl $12, %rsp\n"
        "  lea ap_stacks(%rip), %rax\n"
        "  add %rax, %rsp\n"
        "  call ap_main\n"
        "2: cli\n"
        "  hlt\n"
        "  jmp 2b\n");

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static void putc_(char c) { outb(0x3f8, (u8)c); }
static void puts_(const char *s) { while (*s) putc_(*s++); }
static void put_dec(u64 v) {
    char buf[24];
    int i = 0;
    do { buf[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (i) putc_(buf[--i]);
}
static void halt_forever(void) { for (;;) __asm__ volatile("cli; hlt"); }
static void reset(void) {
    outb(0x64, 0xfe);
    halt_forever();
}

static const char *cmdline;

/* Value of key=value on the command line (up to the next space), or 0. */
static const char *param(const char *key) {
    const char *p = cmdline;
    while (*p) {
        const char *k = key, *q = p;
        while (*k && *q == *k) { k++; q++; }
        if (!*k && *q == '=' && (p == cmdline || p[-1] == ' ')) return q + 1;
        p++;
    }
    return 0;
}
/* Like param(), but searching from `from` on; returns just past the value's '='. */
static const char *param_from(const char *from, const char *key) {
    for (const char *p = from; *p; p++) {
        const char *k = key, *q = p;
        while (*k && *q == *k) { k++; q++; }
        if (!*k && *q == '=' && (p == cmdline || p[-1] == ' ')) return q + 1;
    }
    return 0;
}

static int value_is(const char *v, const char *want) {
    if (!v) return 0;
    while (*want && *v == *want) { v++; want++; }
    return !*want && (*v == 0 || *v == ' ');
}
static u64 parse_num(const char *v) {
    u64 n = 0;
    int base = 10;
    if (v[0] == '0' && v[1] == 'x') { base = 16; v += 2; }
    for (;; v++) {
        int d;
        if (*v >= '0' && *v <= '9') d = *v - '0';
        else if (base == 16 && *v >= 'a' && *v <= 'f') d = *v - 'a' + 10;
        else break;
        n = n * (u64)base + (u64)d;
    }
    return n;
}

/* ---- virtio-mmio block, polled ---- */
#define QSIZE 8
struct desc { u64 addr; u32 len; u16 flags; u16 next; };
static struct desc descs[QSIZE] __attribute__((aligned(16)));
static struct { u16 flags; u16 idx; u16 ring[QSIZE]; u16 used_event; } avail __attribute__((aligned(2)));
static struct { u16 flags; u16 idx; struct { u32 id; u32 len; } ring[QSIZE]; u16 avail_event; } used __attribute__((aligned(4)));
static struct { u32 type; u32 ioprio; u64 sector; } hdr;
static u8 data[512] __attribute__((aligned(512)));
static volatile u8 status;
static u64 mmio;
/* When set, request() gives up with -1 once the device says it needs a reset. */
static int watch_needs_reset;

static u32 rd(u32 off) { return *(volatile u32 *)(mmio + off); }
static void wr(u32 off, u32 v) { *(volatile u32 *)(mmio + off) = v; }
static void fail(const char *why) { puts_("BLK-FAIL "); puts_(why); putc_('\n'); reset(); }

static int request(u32 type, u64 sector) {
    hdr.type = type; hdr.ioprio = 0; hdr.sector = sector;
    descs[0] = (struct desc){(u64)&hdr, 16, 1, 1};
    descs[1] = (struct desc){(u64)data, 512, (u16)(1 | (type == 0 ? 2 : 0)), 2};
    descs[2] = (struct desc){(u64)&status, 1, 2, 0};
    status = 0xff;
    u16 want = (u16)(used.idx + 1);
    avail.ring[avail.idx % QSIZE] = 0;
    __asm__ volatile("mfence" ::: "memory");
    avail.idx++;
    __asm__ volatile("mfence" ::: "memory");
    wr(0x50, 0);
    for (u32 spins = 0; *(volatile u16 *)&used.idx != want; spins++) {
        if (spins > 5000000) fail("timeout");
        if (watch_needs_reset && (rd(0x70) & 0x40)) return -1;
    }
    return status;
}

static void blk_init(void) {
    const char *dev = param("virtio_mmio.device");
    if (!dev) fail("no virtio_mmio.device");
    while (*dev && *dev != '@') dev++;
    mmio = parse_num(dev + 1);
    if (rd(0) != 0x74726976 || rd(4) != 2) fail("not virtio-mmio v2");
    if (rd(8) != 2) fail("not a block device");
    wr(0x70, 0);
    wr(0x70, 1);
    wr(0x70, 1 | 2);
    wr(0x24, 1); wr(0x20, 1); /* VIRTIO_F_VERSION_1 */
    wr(0x24, 0); wr(0x20, 0);
    wr(0x70, 1 | 2 | 8);
    if (!(rd(0x70) & 8)) fail("features refused");
    wr(0x30, 0);
    if (rd(0x34) < QSIZE) fail("queue too small");
    wr(0x38, QSIZE);
    wr(0x80, (u32)(u64)descs); wr(0x84, 0);
    wr(0x90, (u32)(u64)&avail); wr(0x94, 0);
    wr(0xa0, (u32)(u64)&used); wr(0xa4, 0);
    wr(0x44, 1);
    wr(0x70, 1 | 2 | 8 | 4);
    u64 capacity = rd(0x100) | ((u64)rd(0x104) << 32);
    puts_("BLK-CAPACITY="); put_dec(capacity); putc_('\n');
}

static u64 blk_sector_arg(void) {
    const char *sector_arg = param("blk_sector");
    return sector_arg ? parse_num(sector_arg) : 1;
}

static void blk_write_pattern(void) {
    const char *pattern = param("blk_pattern");
    for (int i = 0; i < 512; i++) data[i] = 0;
    for (int i = 0; pattern && pattern[i] && pattern[i] != ' ' && i < 511; i++) data[i] = (u8)pattern[i];
    int st = request(1, blk_sector_arg());
    puts_("BLK-WRITE-STATUS="); put_dec((u64)st); putc_('\n');
}

static void blk_read_back(void) {
    for (int i = 0; i < 512; i++) data[i] = 0;
    int st = request(0, blk_sector_arg());
    puts_("BLK-READ-STATUS="); put_dec((u64)st); putc_('\n');
    puts_("BLK-READBACK=");
    for (int i = 0; i < 64 && data[i]; i++) putc_((char)data[i]);
    putc_('\n');
}

static void blk(void) {
    blk_init();
    blk_write_pattern();
    blk_read_back();
}

/* Writes "blkloop N" to sector base+N until the device fails (see the scenario list). */
static void blk_loop(void) {
    blk_init();
    watch_needs_reset = 1;
    u64 base = blk_sector_arg();
    for (u64 n = 0; n < 4096; n++) {
        for (int i = 0; i < 512; i++) data[i] = 0;
        const char *word = "blkloop ";
        int k = 0;
        for (; word[k]; k++) data[k] = (u8)word[k];
        char digits[24];
        int d = 0;
        u64 v = n;
        do { digits[d++] = (char)('0' + v % 10); v /= 10; } while (v);
        while (d) data[k++] = (u8)digits[--d];
        int st = request(1, base + n);
        if (st < 0) {
            puts_("BLK-ERROR device needs reset at write "); put_dec(n); putc_('\n');
            halt_forever();
        }
        puts_("blk-io "); put_dec(n); puts_(" status="); put_dec((u64)st); putc_('\n');
    }
    puts_("BLK-LOOP-DONE\n");
    halt_forever();
}

/* Prints "wait N" n times, as slowly as the counter: time for a snapshot. */
static void wait_ticks(u64 n) {
    for (u64 i = 0; i < n; i++) {
        puts_("wait ");
        put_dec(i);
        putc_('\n');
        for (volatile u32 j = 0; j < 2000; j++) {
        }
    }
}

/* ---- virtio-mmio vsock, polled: rx (0), tx (1), event (2) ---- */
struct vq {
    struct desc desc[QSIZE];
    struct { u16 flags; u16 idx; u16 ring[QSIZE]; u16 used_event; } avail;
    struct { u16 flags; u16 idx; struct { u32 id; u32 len; } ring[QSIZE]; u16 avail_event; } used;
    u16 last_used;
} __attribute__((aligned(16)));
static struct vq vqs[3];
struct __attribute__((packed)) vsock_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
};
static u8 rx_bufs[QSIZE][44 + 256];
static struct { struct vsock_hdr h; u8 payload[128]; } tx_pkt;
static u64 guest_cid;

static void vq_setup(u32 index) {
    struct vq *q = &vqs[index];
    wr(0x30, index);
    if (rd(0x34) < QSIZE) fail("vsock queue too small");
    wr(0x38, QSIZE);
    wr(0x80, (u32)(u64)q->desc); wr(0x84, 0);
    wr(0x90, (u32)(u64)&q->avail); wr(0x94, 0);
    wr(0xa0, (u32)(u64)&q->used); wr(0xa4, 0);
    wr(0x44, 1);
}

static void vq_push(u32 index, u16 head) {
    struct vq *q = &vqs[index];
    q->avail.ring[q->avail.idx % QSIZE] = head;
    __asm__ volatile("mfence" ::: "memory");
    q->avail.idx++;
    __asm__ volatile("mfence" ::: "memory");
    wr(0x50, index);
}

/* Waits for the next used element of a queue; returns its descriptor id. */
static u16 vq_wait(u32 index) {
    struct vq *q = &vqs[index];
    for (u32 spins = 0; *(volatile u16 *)&q->used.idx == q->last_used; spins++)
        if (spins > 5000000) fail("vsock timeout");
    u16 id = (u16)q->used.ring[q->last_used % QSIZE].id;
    q->last_used++;
    return id;
}

static void vsock_send(u16 op, u32 src_port, u32 dst_port, const char *payload) {
    u32 len = 0;
    while (payload && payload[len] && payload[len] != ' ' && len < sizeof tx_pkt.payload) {
        tx_pkt.payload[len] = (u8)payload[len];
        len++;
    }
    tx_pkt.h = (struct vsock_hdr){guest_cid, 2, src_port, dst_port, len, 1, op, 0, 4096, 0};
    vqs[1].desc[0] = (struct desc){(u64)&tx_pkt, 44 + len, 0, 0};
    vq_push(1, 0);
    vq_wait(1);
}

/* The next packet from the host; its buffer is posted again. */
static struct vsock_hdr *vsock_recv(void) {
    u16 id = vq_wait(0);
    static u8 copy[44 + 256];
    for (int i = 0; i < 44 + 256; i++) copy[i] = rx_bufs[id][i];
    vq_push(0, id);
    return (struct vsock_hdr *)copy;
}

static u8 event_buf[8];

static void vsock_init(void) {
    mmio = 0;
    for (const char *p = cmdline; (p = param_from(p, "virtio_mmio.device")); ) {
        const char *at = p;
        while (*at && *at != '@') at++;
        mmio = parse_num(at + 1);
        if (rd(0) == 0x74726976 && rd(8) == 19) break;
        mmio = 0;
    }
    if (!mmio) fail("no virtio-mmio vsock device");
    wr(0x70, 0); wr(0x70, 1); wr(0x70, 1 | 2);
    wr(0x24, 1); wr(0x20, 1);
    wr(0x24, 0); wr(0x20, 0);
    wr(0x70, 1 | 2 | 8);
    if (!(rd(0x70) & 8)) fail("vsock features refused");
    for (u32 i = 0; i < 3; i++) vq_setup(i);
    wr(0x70, 1 | 2 | 8 | 4);
    guest_cid = rd(0x100) | ((u64)rd(0x104) << 32);
    puts_("VSOCK-CID="); put_dec(guest_cid); putc_('\n');
    for (u16 i = 0; i < QSIZE; i++) {
        vqs[0].desc[i] = (struct desc){(u64)rx_bufs[i], sizeof rx_bufs[i], 2, 0};
        vq_push(0, i);
    }
}

/* Connects to the host port, sends vsock_msg=, prints what comes back, resets. */
static void vsock_echo(void) {
    const char *port_arg = param("vsock_port");
    u32 port = port_arg ? (u32)parse_num(port_arg) : 5000;
    vsock_send(1, 1234, port, 0); /* REQUEST */
    struct vsock_hdr *h = vsock_recv();
    if (h->op != 2) fail("vsock connect refused");
    puts_("VSOCK-CONNECTED\n");
    vsock_send(5, 1234, port, param("vsock_msg")); /* RW */
    do { h = vsock_recv(); } while (h->op == 6); /* skip credit updates */
    if (h->op != 5) fail("vsock: no data back");
    puts_("VSOCK-ECHO=");
    for (u32 i = 0; i < h->len && i < 256; i++) putc_((char)((u8 *)h)[44 + i]);
    putc_('\n');
    vsock_send(3, 1234, port, 0); /* RST */
}

static void vsock(void) {
    vsock_init();
    vsock_echo();
}

/* Posts a buffer on the event queue and waits, without a timeout, for an event: a
 * restored VM gets VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (id 0) from its new daemon. */
static void vsock_wait_event(void) {
    struct vq *q = &vqs[2];
    q->desc[0] = (struct desc){(u64)event_buf, sizeof event_buf, 2, 0};
    vq_push(2, 0);
    puts_("VSOCK-READY\n");
    while (*(volatile u16 *)&q->used.idx == q->last_used) {
    }
    q->last_used++;
    puts_("VSOCK-EVENT="); put_dec(*(volatile u32 *)event_buf); putc_('\n');
}

/* ---- virtio-mmio net, polled: rx (0), tx (1); VERSION_1, so a 12-byte header ---- */
#define NET_HDR 12
#define NET_FRAME 1514
static u8 net_rx[QSIZE][NET_HDR + NET_FRAME];
static u8 net_tx[NET_HDR + 128];
static u8 net_mac[6];
static const u8 net_guest_ip[4] = {10, 0, 2, 15};
static const u8 net_gateway_ip[4] = {10, 0, 2, 2};

static void net_fail(const char *why) { puts_("NET-FAIL "); puts_(why); putc_('\n'); reset(); }

static void put_hex8(u8 v) {
    const char *digits = "0123456789abcdef";
    putc_(digits[v >> 4]);
    putc_(digits[v & 15]);
}

static void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static int same(const u8 *a, const u8 *b, u32 n) {
    for (u32 i = 0; i < n; i++)
        if (a[i] != b[i]) return 0;
    return 1;
}
static void copy(u8 *dst, const u8 *src, u32 n) { for (u32 i = 0; i < n; i++) dst[i] = src[i]; }

/* The Internet checksum (RFC 1071) of n bytes. */
static u16 inet_checksum(const u8 *p, u32 n) {
    u32 sum = 0;
    for (u32 i = 0; i + 1 < n; i += 2) sum += get16(p + i);
    if (n & 1) sum += (u32)p[n - 1] << 8;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

static void net_init(void) {
    mmio = 0;
    for (const char *p = cmdline; (p = param_from(p, "virtio_mmio.device")); ) {
        const char *at = p;
        while (*at && *at != '@') at++;
        mmio = parse_num(at + 1);
        if (rd(0) == 0x74726976 && rd(8) == 1) break;
        mmio = 0;
    }
    if (!mmio) net_fail("no virtio-mmio net device");
    wr(0x70, 0); wr(0x70, 1); wr(0x70, 1 | 2);
    wr(0x14, 0);
    if (!(rd(0x10) & (1 << 5))) net_fail("no VIRTIO_NET_F_MAC");
    wr(0x24, 1); wr(0x20, 1);        /* VIRTIO_F_VERSION_1 */
    wr(0x24, 0); wr(0x20, 1 << 5);   /* VIRTIO_NET_F_MAC */
    wr(0x70, 1 | 2 | 8);
    if (!(rd(0x70) & 8)) net_fail("features refused");
    for (u32 i = 0; i < 2; i++) vq_setup(i);
    wr(0x70, 1 | 2 | 8 | 4);
    u32 lo = rd(0x100), hi = rd(0x104);
    for (int i = 0; i < 4; i++) net_mac[i] = (u8)(lo >> (8 * i));
    net_mac[4] = (u8)hi; net_mac[5] = (u8)(hi >> 8);
    puts_("NET-MAC=");
    for (int i = 0; i < 6; i++) { if (i) putc_(':'); put_hex8(net_mac[i]); }
    putc_('\n');
    for (u16 i = 0; i < QSIZE; i++) {
        vqs[0].desc[i] = (struct desc){(u64)net_rx[i], sizeof net_rx[i], 2, 0};
        vq_push(0, i);
    }
}

/* Sends the frame in net_tx (after its header) of `len` bytes. */
static void net_send(u32 len) {
    for (int i = 0; i < NET_HDR; i++) net_tx[i] = 0;
    vqs[1].desc[0] = (struct desc){(u64)net_tx, NET_HDR + len, 0, 0};
    vq_push(1, 0);
    vq_wait(1);
}

/* The next frame from the device (copied; its buffer is posted again) and its length. */
static u8 net_frame[NET_FRAME];
static u32 net_recv(void) {
    struct vq *q = &vqs[0];
    for (u32 spins = 0; *(volatile u16 *)&q->used.idx == q->last_used; spins++)
        if (spins > 5000000) net_fail("timeout");
    u32 slot = q->last_used % QSIZE;
    u16 id = (u16)q->used.ring[slot].id;
    u32 len = q->used.ring[slot].len;
    q->last_used++;
    if (id >= QSIZE || len < NET_HDR || len > NET_HDR + NET_FRAME) net_fail("bad rx element");
    len -= NET_HDR;
    copy(net_frame, net_rx[id] + NET_HDR, len);
    vq_push(0, id);
    return len;
}

/* ARP who-has 10.0.2.2; returns once the gateway's reply is in net_mac_gw. */
static u8 net_mac_gw[6];
static void net_arp(void) {
    u8 *f = net_tx + NET_HDR;
    for (int i = 0; i < 6; i++) f[i] = 0xff;
    copy(f + 6, net_mac, 6);
    put16(f + 12, 0x0806);
    u8 *a = f + 14;
    put16(a, 1); put16(a + 2, 0x0800); a[4] = 6; a[5] = 4; put16(a + 6, 1);
    copy(a + 8, net_mac, 6); copy(a + 14, net_guest_ip, 4);
    for (int i = 0; i < 6; i++) a[18 + i] = 0;
    copy(a + 24, net_gateway_ip, 4);
    net_send(42);
    for (int tries = 0; tries < 8; tries++) {
        u32 len = net_recv();
        const u8 *r = net_frame + 14;
        if (len < 42 || get16(net_frame + 12) != 0x0806 || get16(r + 6) != 2) continue;
        if (!same(r + 14, net_gateway_ip, 4) || !same(r + 24, net_guest_ip, 4)) continue;
        copy(net_mac_gw, r + 8, 6);
        puts_("NET-ARP=");
        for (int i = 0; i < 6; i++) { if (i) putc_(':'); put_hex8(net_mac_gw[i]); }
        putc_('\n');
        return;
    }
    net_fail("no ARP reply");
}

/* ICMP echo request to the gateway; prints NET-PING=ok on the matching reply. */
static void net_ping(void) {
    static const char payload[] = "microagent-ping";
    const u32 plen = sizeof payload - 1, icmp_len = 8 + plen, ip_len = 20 + icmp_len;
    u8 *f = net_tx + NET_HDR;
    copy(f, net_mac_gw, 6);
    copy(f + 6, net_mac, 6);
    put16(f + 12, 0x0800);
    u8 *ip = f + 14;
    ip[0] = 0x45; ip[1] = 0; put16(ip + 2, (u16)ip_len); put16(ip + 4, 0x4d41);
    put16(ip + 6, 0); ip[8] = 64; ip[9] = 1; put16(ip + 10, 0);
    copy(ip + 12, net_guest_ip, 4); copy(ip + 16, net_gateway_ip, 4);
    put16(ip + 10, inet_checksum(ip, 20));
    u8 *icmp = ip + 20;
    icmp[0] = 8; icmp[1] = 0; put16(icmp + 2, 0); put16(icmp + 4, 0x1234); put16(icmp + 6, 1);
    copy(icmp + 8, (const u8 *)payload, plen);
    put16(icmp + 2, inet_checksum(icmp, icmp_len));
    net_send(14 + ip_len);
    for (int tries = 0; tries < 8; tries++) {
        u32 len = net_recv();
        const u8 *rip = net_frame + 14, *r = rip + 20;
        if (len < 14 + ip_len || get16(net_frame + 12) != 0x0800 || rip[0] != 0x45 || rip[9] != 1)
            continue;
        if (!same(rip + 12, net_gateway_ip, 4) || !same(rip + 16, net_guest_ip, 4)) continue;
        if (r[0] != 0 || get16(r + 4) != 0x1234 || get16(r + 6) != 1) continue;
        if (!same(r + 8, (const u8 *)payload, plen)) net_fail("echo payload differs");
        if (inet_checksum(rip, 20) != 0 || inet_checksum(r, icmp_len) != 0) net_fail("bad checksum");
        puts_("NET-PING=ok\n");
        return;
    }
    net_fail("no echo reply");
}

/* Parses "a.b.c.d:port" into ip and port; 0 when it does not parse. */
static int parse_ip_port(const char *v, u8 ip[4], u16 *port) {
    for (int i = 0; i < 4; i++) {
        u32 n = 0, digits = 0;
        for (; *v >= '0' && *v <= '9'; v++, digits++) n = n * 10 + (u32)(*v - '0');
        if (!digits || n > 255 || *v != (i < 3 ? '.' : ':')) return 0;
        ip[i] = (u8)n;
        v++;
    }
    u32 n = 0, digits = 0;
    for (; *v >= '0' && *v <= '9'; v++, digits++) n = n * 10 + (u32)(*v - '0');
    if (!digits || n == 0 || n > 65535) return 0;
    *port = (u16)n;
    return 1;
}

/* net_udp=IP:PORT: a UDP datagram from 10.0.2.15:40000 through the gateway to IP:PORT;
 * prints NET-UDP=<payload of the reply to port 40000>. */
static void net_udp(const char *dest) {
    static const char payload[] = "microagent-udp";
    u8 ip_dst[4];
    u16 port;
    if (!parse_ip_port(dest, ip_dst, &port)) net_fail("bad net_udp=");
    const u32 plen = sizeof payload - 1, udp_len = 8 + plen, ip_len = 20 + udp_len;
    u8 *f = net_tx + NET_HDR;
    copy(f, net_mac_gw, 6);
    copy(f + 6, net_mac, 6);
    put16(f + 12, 0x0800);
    u8 *ip = f + 14;
    ip[0] = 0x45; ip[1] = 0; put16(ip + 2, (u16)ip_len); put16(ip + 4, 2); put16(ip + 6, 0x4000);
    ip[8] = 64; ip[9] = 17; put16(ip + 10, 0);
    copy(ip + 12, net_guest_ip, 4); copy(ip + 16, ip_dst, 4);
    put16(ip + 10, inet_checksum(ip, 20));
    u8 *udp = ip + 20;
    put16(udp, 40000); put16(udp + 2, port); put16(udp + 4, (u16)udp_len); put16(udp + 6, 0);
    copy(udp + 8, (const u8 *)payload, plen);
    net_send(14 + ip_len);
    for (int tries = 0; tries < 16; tries++) {
        u32 len = net_recv();
        const u8 *rip = net_frame + 14, *r = rip + 20;
        if (len < 14 + 28 || get16(net_frame + 12) != 0x0800 || rip[0] != 0x45 || rip[9] != 17)
            continue;
        if (!same(rip + 12, ip_dst, 4) || get16(r + 2) != 40000) continue;
        u32 n = get16(r + 4);
        if (n < 8 || 14 + 20 + n > len) net_fail("bad UDP length");
        puts_("NET-UDP=");
        for (u32 i = 8; i < n; i++) putc_((char)r[i]);
        putc_('\n');
        return;
    }
    net_fail("no UDP reply");
}

/* ---- several vCPUs: each AP counts in its own slot ---- */
#define MAX_APS 31
volatile u32 ap_count;
u8 ap_stacks[MAX_APS][4096] __attribute__((aligned(4096)));
static volatile u64 ap_counters[MAX_APS];
extern u8 tramp_start[], tramp_end[];

void ap_main(u32 index) {
    if (index >= MAX_APS) halt_forever();
    for (;;) ap_counters[index]++;
}

static void lapic_icr(u32 high, u32 low) {
    *(volatile u32 *)0xfee00310 = high;
    *(volatile u32 *)0xfee00300 = low;
    while (*(volatile u32 *)0xfee00300 & (1 << 12)) {
    }
}

/* Starts every AP (INIT, SIPI, SIPI to all but self), then prints a tick line with
 * each AP's counter, forever. */
static void smp(void) {
    const char *arg = param("smp_aps");
    u32 aps = arg ? (u32)parse_num(arg) : 1;
    u8 *dst = (u8 *)0x10000;
    for (u8 *p = tramp_start; p < tramp_end; p++) *dst++ = *p;
    lapic_icr(0, 0x000c4500);
    lapic_icr(0, 0x000c4610);
    lapic_icr(0, 0x000c4610);
    for (u32 spins = 0; ap_count < aps; spins++)
        if (spins > 50000000) { puts_("SMP-FAIL ap_count="); put_dec(ap_count); putc_('\n'); reset(); }
    puts_("SMP-UP="); put_dec(ap_count); putc_('\n');
    for (u64 i = 0;; i++) {
        puts_("tick ");
        put_dec(i);
        for (u32 a = 0; a < aps; a++) {
            puts_(" ap");
            put_dec(a);
            putc_('=');
            put_dec(ap_counters[a]);
        }
        putc_('\n');
        for (volatile u32 j = 0; j < 2000; j++) {
        }
    }
}

void guest_main(u8 *boot_params) {
    cmdline = (const char *)(u64) * (u32 *)(boot_params + 0x228);
    puts_("microagent test guest: cmdline=[");
    puts_(cmdline);
    puts_("]\n");
    const char *scenario = param("scenario");
    if (value_is(scenario, "blk")) {
        blk();
        puts_("TEST-GUEST-DONE\n");
        reset();
    } else if (value_is(scenario, "blk_snapshot")) {
        blk_init();
        blk_write_pattern();
        puts_("BLK-WRITTEN\n");
        const char *n = param("blk_wait");
        wait_ticks(n ? parse_num(n) : 300);
        blk_read_back();
        puts_("TEST-GUEST-DONE\n");
        reset();
    } else if (value_is(scenario, "vsock_snapshot")) {
        vsock_init();
        vsock_wait_event();
        vsock_echo();
        puts_("TEST-GUEST-DONE\n");
        reset();
    } else if (value_is(scenario, "vsock")) {
        vsock();
        puts_("TEST-GUEST-DONE\n");
        reset();
    } else if (value_is(scenario, "net")) {
        net_init();
        net_arp();
        net_ping();
        const char *udp = param("net_udp");
        if (udp) net_udp(udp);
        puts_("TEST-GUEST-DONE\n");
        reset();
    } else if (value_is(scenario, "blk_loop")) {
        blk_loop();
    } else if (value_is(scenario, "counter")) {
        for (u64 i = 0;; i++) {
            puts_("tick ");
            put_dec(i);
            putc_('\n');
            for (volatile u32 j = 0; j < 2000; j++) {
            }
        }
    } else if (value_is(scenario, "smp")) {
        smp();
    } else if (value_is(scenario, "halt")) {
        puts_("HALTING\n");
        halt_forever();
    } else if (value_is(scenario, "reset_then_print")) {
        outb(0x64, 0xfe);
        /* Straight to the UART without polling its status: as many bytes as a vCPU
         * that runs on gets through. */
        for (;;)
            for (const char *p = "AFTER-RESET\n"; *p; p++) outb(0x3f8, (u8)*p);
    }
    puts_("TEST-GUEST-DONE\n");
    reset();
}
