/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The bed's MMIO "test device": how an L2 guest program talks to the reference VMM.
 *
 * One 4 KiB page of guest-physical space that is not RAM, so every access is a KVM_EXIT_MMIO the
 * VMM serves (kvm_run.mmio). The guest builds text lines byte by byte (numbers in one access),
 * the VMM prints each finished line as "HB g[<guest>] <line>" on the L1 console, which the host
 * harness parses. This is a contract between guests/rt and src/vm.c only; the agent never sees it.
 */
#ifndef HB_TESTDEV_H
#define HB_TESTDEV_H

#define HB_TESTDEV_BASE      0x09000000ull /* below the RAM at HB_GUEST_RAM_BASE */
#define HB_TESTDEV_SIZE      0x1000ull

/* Writes (any width up to 64 bits; the value is little-endian). */
#define HB_TD_PUTC           0x000 /* append one byte to the line; '\n' prints the line */
#define HB_TD_PUTHEX         0x008 /* append "0x%llx" */
#define HB_TD_PUTDEC         0x010 /* append "%llu" */
#define HB_TD_EXIT           0x018 /* the program is done: its status (0 = passed) */
#define HB_TD_SAMPLES_GPA    0x020 /* guest-physical address of a u64 array of counter ticks */
#define HB_TD_SAMPLES_COUNT  0x028 /* number of samples: prints the line + their statistics */
#define HB_TD_WAIT           0x030 /* prints "HB wait ... <line>" and blocks until the host says go */
/* Reads (64 bits). */
#define HB_TD_NARGS          0x040 /* how many run arguments the plan gave this program */
#define HB_TD_ARG0           0x100 /* argument i at HB_TD_ARG0 + 8 * i, i < HB_TD_MAX_ARGS */
#define HB_TD_MAX_ARGS       16

/* Where guest programs live (the VMM loads the flat binary at the RAM base and starts there). */
#define HB_GUEST_RAM_BASE    0x40000000ull
#define HB_GUEST_RAM_SIZE    (16ull << 20)

#endif /* HB_TESTDEV_H */
