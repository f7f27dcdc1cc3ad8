/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/* uplinkd: <asm/byteorder.h> for the bpfel target (the only one built). */
#pragma once
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "uplinkd builds only for the bpfel target"
#endif
#include <linux/byteorder/little_endian.h>
