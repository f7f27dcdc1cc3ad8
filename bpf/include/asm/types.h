/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/* uplinkd: architecture-neutral stand-in for <asm/types.h> (BPF target). */
#pragma once
#include <asm-generic/types.h>
