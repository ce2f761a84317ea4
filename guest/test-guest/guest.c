/*
 * microagent test guest: a freestanding program that microagent-vmm boots like a
 * kernel (64-bit Linux boot protocol, boot parameters in RSI). It runs without
 * interrupts, exceptions or SSE, so it works even where guest kernel code is
 * instruction-emulated (PVM hosts). Scenarios are chosen on the command line:
 *
 *   scenario=banner   print the command line, then reset through the i8042
 *   scenario=blk      drive the first virtio-mmio block device by polling: write
 *                     blk_pattern= at sector blk_sector=, read it back, reset
 *   scenario=counter  print "tick N" forever (for pause/resume)
 *   scenario=halt     print the banner, then cli; hlt forever
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
    for (u32 spins = 0; *(volatile u16 *)&used.idx != want; spins++)
        if (spins > 5000000) fail("timeout");
    return status;
}

static void blk(void) {
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

    const char *pattern = param("blk_pattern");
    const char *sector_arg = param("blk_sector");
    u64 sector = sector_arg ? parse_num(sector_arg) : 1;
    for (int i = 0; i < 512; i++) data[i] = 0;
    for (int i = 0; pattern && pattern[i] && pattern[i] != ' ' && i < 511; i++) data[i] = (u8)pattern[i];
    int st = request(1, sector);
    puts_("BLK-WRITE-STATUS="); put_dec((u64)st); putc_('\n');
    for (int i = 0; i < 512; i++) data[i] = 0;
    st = request(0, sector);
    puts_("BLK-READ-STATUS="); put_dec((u64)st); putc_('\n');
    puts_("BLK-READBACK=");
    for (int i = 0; i < 64 && data[i]; i++) putc_((char)data[i]);
    putc_('\n');
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
    } else if (value_is(scenario, "counter")) {
        for (u64 i = 0;; i++) {
            puts_("tick ");
            put_dec(i);
            putc_('\n');
            for (volatile u32 j = 0; j < 2000; j++) {
            }
        }
    } else if (value_is(scenario, "halt")) {
        puts_("HALTING\n");
        halt_forever();
    }
    puts_("TEST-GUEST-DONE\n");
    reset();
}
