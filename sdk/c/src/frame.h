/*
 * frame.h: internal helpers shared by worker.c and client.c (little-endian byte access, the
 * kind table, and full-buffer socket I/O). Not installed.
 */
#ifndef ACGI_FRAME_H
#define ACGI_FRAME_H

#include "acgi.h"

void acgi_put_u16(uint8_t *p, uint16_t v);
void acgi_put_u32(uint8_t *p, uint32_t v);
void acgi_put_u64(uint8_t *p, uint64_t v);
uint16_t acgi_get_u16(const uint8_t *p);
uint32_t acgi_get_u32(const uint8_t *p);
uint64_t acgi_get_u64(const uint8_t *p);
int acgi_kind_known(unsigned kind);

/* Send the header and then `len` payload bytes, whole, retrying on EINTR and short writes;
 * MSG_NOSIGNAL, so a closed peer is an error (EPIPE), not a signal. 0 or -1 (errno set). */
int acgi_send_frame(int fd, const acgi_header *h, const void *payload, size_t len);

#endif
