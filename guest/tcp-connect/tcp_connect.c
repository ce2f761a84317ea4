/*
 * A small static program for the network benchmark's connection set-up rate: one
 * process making COUNT short TCP connections in a row, so the guest's process start-up
 * does not dominate what is measured.
 *
 *   tcp_connect IP PORT COUNT   COUNT times: connect to IP:PORT, read to EOF, close;
 *                               print CONNECT-DONE ok=<connections that got a byte>
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: tcp_connect IP PORT COUNT\n");
        return 2;
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1) {
        fprintf(stderr, "tcp_connect: bad address %s\n", argv[1]);
        return 2;
    }
    int count = atoi(argv[3]), ok = 0;
    for (int i = 0; i < count; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) {
            perror("tcp_connect: socket");
            return 1;
        }
        if (connect(fd, (struct sockaddr *)&to, sizeof to) == 0) {
            char buf[64];
            ssize_t n, got = 0;
            while ((n = read(fd, buf, sizeof buf)) > 0) got += n;
            if (got > 0) ok++;
        }
        close(fd);
    }
    printf("CONNECT-DONE ok=%d\n", ok);
    return ok == count ? 0 : 1;
}
