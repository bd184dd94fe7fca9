/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * What the dom0 test programs print: one "KEMARI-CHECK <name> PASS|FAIL
 * <detail>" line per check (the Python side parses them), and a final
 * "KEMARI-RESULT PASS|FAIL failures=<n>".
 */
#ifndef CHECKS_H
#define CHECKS_H

#include <stdbool.h>

/* Print the check's line; count it if it failed.  Returns ok. */
bool check(bool ok, const char *name, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Print KEMARI-RESULT; the process's exit status: 0 if no check failed. */
int check_result(void);

/* How many checks failed so far. */
int check_failed(void);

/* CLOCK_MONOTONIC in milliseconds. */
double now_ms(void);

#endif
