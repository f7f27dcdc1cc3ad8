/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/* uplinkd: <asm/bitsperlong.h> for the BPF target, whose longs are 64-bit. */
#pragma once
#define __BITS_PER_LONG 64
#include <asm-generic/bitsperlong.h>
