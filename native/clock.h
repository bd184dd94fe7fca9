/* clock.h - the one clock the native fast paths read (CLOCK_MONOTONIC, as
 * Python's time.monotonic_ns), for the stage trace's moments and their waits. */
#ifndef KEMARI_CLOCK_H
#define KEMARI_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline int64_t kclock_now_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

#endif
