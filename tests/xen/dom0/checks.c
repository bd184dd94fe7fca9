/* SPDX-License-Identifier: GPL-2.0-only */
#include <stdarg.h>
#include <stdio.h>
#include <time.h>

#include "checks.h"

static int failures;

bool check(bool ok, const char *name, const char *fmt, ...)
{
	va_list ap;

	printf("KEMARI-CHECK %s %s ", name, ok ? "PASS" : "FAIL");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	if (!ok)
		failures++;
	return ok;
}

int check_result(void)
{
	printf("KEMARI-RESULT %s failures=%d\n", failures ? "FAIL" : "PASS",
	       failures);
	return failures ? 1 : 0;
}

int check_failed(void)
{
	return failures;
}

double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}
