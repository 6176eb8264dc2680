/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Console output of the reference VMM: every line starts with "HB " and then a record kind and
 * key=value fields, so the host harness (tools/hyperbroker_tools/kvm_bed) can parse the L1 console.
 * Lines from several threads never interleave.
 */
#ifndef HB_LOG_H
#define HB_LOG_H

#include <stdint.h>

void hb_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
uint64_t hb_now_ns(void); /* CLOCK_MONOTONIC */
const char *hb_errno_name(int err); /* "OK" for 0, "EEXIST" ..., else "E<number>" */

#endif /* HB_LOG_H */
