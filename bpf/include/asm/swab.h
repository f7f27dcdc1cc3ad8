/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/* uplinkd: no architecture byte-swap instructions; <linux/swab.h> falls back
 * to its generic versions and bpf_endian.h uses the compiler builtins. */
#pragma once
