/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/* uplinkd: architecture-neutral stand-in for <asm/posix_types.h>. */
#pragma once
#include <asm-generic/posix_types.h>
