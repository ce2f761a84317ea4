/*
 * A small static test program for the QEMU Linux rig's vsock tests.
 *
 *   vsock_echo listen PORT COUNT   accept COUNT connections on PORT, echo each (one
 *                                  process per connection) until EOF; print ECHO-DONE
 *   vsock_echo connect PORT MSG    connect to the host (CID 2) on PORT, send MSG, shut
 *                                  down writing, print REPLY:<what came back>
 */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static void echo(int fd) {
    static char buf[1 << 16];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0) break;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(fd, buf + off, (size_t)(n - off));
            if (w <= 0) return;
            off += w;
        }
    }
}

static int do_listen(unsigned port, int count) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    if (s < 0 || bind(s, (struct sockaddr *)&addr, sizeof addr) || listen(s, 64)) {
        perror("vsock listen");
        return 1;
    }
    printf("LISTENING %u\n", port);
    fflush(stdout);
    for (int i = 0; i < count; i++) {
        int c = accept(s, NULL, NULL);
        if (c < 0) { perror("accept"); return 1; }
        if (fork() == 0) { echo(c); _exit(0); }
        close(c);
    }
    while (wait(NULL) > 0) {}
    printf("ECHO-DONE\n");
    return 0;
}

static int do_connect(unsigned port, const char *msg) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port};
    if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof addr)) {
        perror("vsock connect");
        return 1;
    }
    if (write(s, msg, strlen(msg)) != (ssize_t)strlen(msg)) { perror("write"); return 1; }
    shutdown(s, SHUT_WR);
    char reply[256];
    size_t got = 0;
    for (ssize_t n; got < sizeof reply - 1 && (n = read(s, reply + got, sizeof reply - 1 - got)) > 0;) got += (size_t)n;
    reply[got] = 0;
    printf("REPLY:%s\n", reply);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "listen")) return do_listen((unsigned)atoi(argv[2]), atoi(argv[3]));
    if (argc == 4 && !strcmp(argv[1], "connect")) return do_connect((unsigned)atoi(argv[2]), argv[3]);
    fprintf(stderr, "usage: vsock_echo listen PORT COUNT | connect PORT MSG\n");
    return 2;
}
