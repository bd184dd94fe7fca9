/*
 * vmm.c - Kemari's KVM micro-VMM core (see vmm.h for the contract).
 *
 * Facts about the hosts this runs on (../shared/reference/FACTS.md): KVM is
 * PVM-backed, so guest code runs at CPL 3 (CPL 0 is emulated and slow);
 * writes the VMM makes to guest memory are not in KVM's dirty log, so we
 * track them here; a consistent vCPU snapshot at an I/O exit needs one more
 * KVM_RUN with immediate_exit set.
 */
#define _GNU_SOURCE
#include "vmm.h"
#include "kemari_abi.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <x86intrin.h>

#define KICK_SIGNAL SIGUSR2
#define MAX_MSRS 256

/* Hot pages. Re-protecting a page costs the guest a write-protect fault at
 * its next write: ~20 us on these PVM-backed machines, where a kv request's
 * 13 dirty pages per checkpoint added ~0.6 ms of faults to each batch of
 * requests. A page written again within KVMM_HOT_WINDOW harvests is left
 * writable for KVMM_HOT_LIFETIME harvests: its bit stays set in KVM's log,
 * so every harvest reports it, written or not (a checkpoint leaves it out
 * when it equals the copy last sent: PageCache.drop_unchanged). Then it is
 * re-protected, and joins again only if written again soon. Correctness
 * never depends on the choice: a page is either write-protected or
 * reported. */

struct hot_pages {
    uint32_t max, count;         /* max 0: off */
    uint16_t harvests;           /* harvest number, 0 skipped when it wraps */
    uint16_t *last_written;      /* per page: harvest that last saw it written; 0: never */
    uint64_t *keep;              /* bitmap of the hot pages */
    uint64_t pfn[KVMM_HOT_MAX_PAGES];
    uint16_t since[KVMM_HOT_MAX_PAGES];
};

struct kvmm {
    int kvm, vm, vcpu;
    struct kvm_run *run;
    size_t run_size;
    uint8_t *mem;
    uint64_t mem_bytes, npages, bitmap_words;
    uint32_t slot_flags;
    int tracking;
    uint64_t *kvm_bitmap;        /* scratch for KVM_GET_DIRTY_LOG */
    uint64_t *vmm_bitmap;        /* pages the VMM wrote */
    uint64_t *pending_bitmap;    /* harvested but not yet handed out */
    uint64_t *clear_bitmap;      /* what a harvest re-protects (not the hot pages) */
    struct hot_pages hot;
    uint32_t msr_index[MAX_MSRS];
    uint32_t nmsrs;
    uint32_t xsave_len;
    /* KVM_CAP_SYNC_REGS: KVM copies regs and sregs into kvm_run at every
     * return from KVM_RUN, which saves a checkpoint two ioctls. `regs_synced`
     * says that copy is current: cleared whenever the VMM sets vCPU state. */
    int sync_regs, regs_synced;
    /* Stopped at a port `out` (not string I/O) not yet completed. Where KVM
     * emulates it (PVM), RIP is past it already and completing it changes
     * nothing; where it does not (VMX, SVM), completing moves RIP. Each
     * completion that could tell is counted, and kvmm_get_state_fast_at_out
     * skips completing once it was a no-op OUT_NOOP_TRUSTED times and never
     * moved RIP. */
    int out_pending;
    uint32_t out_noop_seen, out_moved_seen;
    /* The guest's TSC is the host's plus this offset, as long as the host's
     * TSC is stable and nobody set the guest's (KVM_VCPU_TSC_OFFSET); saves a
     * checkpoint the KVM_GET_MSRS. Re-read after the VMM restores state. */
    int tsc_offset_known, only_ioctls;
    uint64_t tsc_offset;
    pthread_t vcpu_thread;
    volatile int thread_known;
};

/* The blob: a fixed header, kernel structs in restore order, MSR entries. */
struct kvmm_state_hdr {
    uint32_t magic, version, total_len, nmsrs, xsave_len, kind, reserved[2];
};

#define MSR_IA32_TSC 0x10
/* Completions of an `out` seen to change nothing before they are skipped. */
#define OUT_NOOP_TRUSTED 3

static __thread char err_buf[256];

static int fail(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(err_buf, sizeof err_buf, fmt, ap);
    va_end(ap);
    if (err && n > 0 && (size_t)n < sizeof err_buf)
        snprintf(err_buf + n, sizeof err_buf - n, ": %s", strerror(err));
    return err ? -err : -EINVAL;
}

const char *kvmm_error(void) { return err_buf; }
uint8_t *kvmm_mem(struct kvmm *vm) { return vm->mem; }
uint64_t kvmm_mem_bytes(struct kvmm *vm) { return vm->mem_bytes; }

static void kick_handler(int sig) { (void)sig; }

static int set_slot(struct kvmm *vm, uint32_t flags)
{
    struct kvm_userspace_memory_region r = {
        .slot = 0, .flags = flags, .guest_phys_addr = 0,
        .memory_size = vm->mem_bytes, .userspace_addr = (uint64_t)(uintptr_t)vm->mem,
    };
    if (ioctl(vm->vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
        return fail(errno, "KVM_SET_USER_MEMORY_REGION");
    vm->slot_flags = flags;
    return 0;
}

static int set_cpuid(struct kvmm *vm)
{
    int n = 256;
    struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + n * sizeof(struct kvm_cpuid_entry2));
    if (!c)
        return fail(ENOMEM, "cpuid");
    c->nent = n;
    int r = 0;
    if (ioctl(vm->kvm, KVM_GET_SUPPORTED_CPUID, c) < 0)
        r = fail(errno, "KVM_GET_SUPPORTED_CPUID");
    else if (ioctl(vm->vcpu, KVM_SET_CPUID2, c) < 0)
        r = fail(errno, "KVM_SET_CPUID2");
    free(c);
    return r;
}

/* Keep only the MSRs KVM lists that this vCPU can actually read back. */
static int probe_msrs(struct kvmm *vm)
{
    struct { struct kvm_msr_list l; uint32_t idx[1024]; } list = { .l.nmsrs = 1024 };
    if (ioctl(vm->kvm, KVM_GET_MSR_INDEX_LIST, &list) < 0)
        return fail(errno, "KVM_GET_MSR_INDEX_LIST");
    vm->nmsrs = 0;
    for (uint32_t i = 0; i < list.l.nmsrs && vm->nmsrs < MAX_MSRS; i++) {
        struct { struct kvm_msrs h; struct kvm_msr_entry e; } one = {
            .h.nmsrs = 1, .e.index = list.idx[i],
        };
        if (ioctl(vm->vcpu, KVM_GET_MSRS, &one) == 1)
            vm->msr_index[vm->nmsrs++] = list.idx[i];
    }
    return 0;
}

void kvmm_destroy(struct kvmm *vm)
{
    if (!vm)
        return;
    if (vm->run && vm->run != MAP_FAILED)
        munmap(vm->run, vm->run_size);
    if (vm->vcpu >= 0)
        close(vm->vcpu);
    if (vm->vm >= 0)
        close(vm->vm);
    if (vm->kvm >= 0)
        close(vm->kvm);
    if (vm->mem && vm->mem != MAP_FAILED)
        munmap(vm->mem, vm->mem_bytes);
    free(vm->kvm_bitmap);
    free(vm->vmm_bitmap);
    free(vm->pending_bitmap);
    free(vm->clear_bitmap);
    free(vm->hot.last_written);
    free(vm->hot.keep);
    free(vm);
}

/* KVM adjusts a vCPU's TSC offset by itself only when the host's TSC is
 * unstable; the kernel then stops using it as its clocksource. */
static int host_tsc_stable(void)
{
    char name[16] = "";
    FILE *f = fopen("/sys/devices/system/clocksource/clocksource0/current_clocksource", "re");
    if (!f)
        return 0;
    int ok = fgets(name, sizeof name, f) != NULL && strcmp(name, "tsc\n") == 0;
    fclose(f);
    return ok;
}

static void read_tsc_offset(struct kvmm *vm)
{
    struct kvm_device_attr attr = {
        .group = KVM_VCPU_TSC_CTRL, .attr = KVM_VCPU_TSC_OFFSET,
        .addr = (uint64_t)(uintptr_t)&vm->tsc_offset,
    };
    vm->tsc_offset_known = !vm->only_ioctls && host_tsc_stable()
        && ioctl(vm->vcpu, KVM_GET_DEVICE_ATTR, &attr) == 0;
}

struct kvmm *kvmm_create(uint64_t mem_bytes)
{
    if (mem_bytes < (8u << 20) || mem_bytes % (2u << 20)) {
        fail(0, "guest memory must be a multiple of 2 MiB and at least 8 MiB");
        return NULL;
    }
    struct kvmm *vm = calloc(1, sizeof *vm);
    if (!vm) {
        fail(ENOMEM, "kvmm_create");
        return NULL;
    }
    vm->kvm = vm->vm = vm->vcpu = -1;
    vm->mem_bytes = mem_bytes;
    vm->npages = mem_bytes / KEMARI_PAGE_SIZE;
    vm->bitmap_words = (vm->npages + 63) / 64;

    struct sigaction sa = { .sa_handler = kick_handler };   /* no SA_RESTART */
    sigemptyset(&sa.sa_mask);
    sigaction(KICK_SIGNAL, &sa, NULL);

    if ((vm->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC)) < 0) {
        fail(errno, "open /dev/kvm");
        goto err;
    }
    if ((vm->vm = ioctl(vm->kvm, KVM_CREATE_VM, 0)) < 0) {
        fail(errno, "KVM_CREATE_VM");
        goto err;
    }
    /* Dirty log with manual re-protection: we clear only what we harvested,
     * and a freshly started log reports every page dirty (the first sync). */
    struct kvm_enable_cap cap = {
        .cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        .args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET,
    };
    if (ioctl(vm->vm, KVM_ENABLE_CAP, &cap) < 0) {
        fail(errno, "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)");
        goto err;
    }
    if (ioctl(vm->vm, KVM_CREATE_IRQCHIP, 0) < 0) {
        fail(errno, "KVM_CREATE_IRQCHIP");
        goto err;
    }
    vm->mem = mmap(NULL, mem_bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (vm->mem == MAP_FAILED) {
        vm->mem = NULL;
        fail(errno, "mmap guest memory");
        goto err;
    }
    if (set_slot(vm, 0) < 0)
        goto err;
    vm->kvm_bitmap = calloc(vm->bitmap_words, 8);
    vm->vmm_bitmap = calloc(vm->bitmap_words, 8);
    vm->pending_bitmap = calloc(vm->bitmap_words, 8);
    vm->clear_bitmap = calloc(vm->bitmap_words, 8);
    if (!vm->kvm_bitmap || !vm->vmm_bitmap || !vm->pending_bitmap || !vm->clear_bitmap) {
        fail(ENOMEM, "dirty bitmaps");
        goto err;
    }
    int run_size = ioctl(vm->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0) {
        fail(errno, "KVM_GET_VCPU_MMAP_SIZE");
        goto err;
    }
    vm->run_size = run_size;
    if ((vm->vcpu = ioctl(vm->vm, KVM_CREATE_VCPU, 0)) < 0) {
        fail(errno, "KVM_CREATE_VCPU");
        goto err;
    }
    vm->run = mmap(NULL, vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu, 0);
    if (vm->run == MAP_FAILED) {
        fail(errno, "mmap kvm_run");
        goto err;
    }
    if (set_cpuid(vm) < 0 || probe_msrs(vm) < 0)
        goto err;
    int xs = ioctl(vm->kvm, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
    vm->xsave_len = xs > (int)sizeof(struct kvm_xsave) ? (uint32_t)xs : sizeof(struct kvm_xsave);
    /* KEMARI_VCPU_IOCTLS=1: read every piece by ioctl, as before (a switch
     * for benchmarks, docs/configuration.md). */
    const char *ioctls = getenv("KEMARI_VCPU_IOCTLS");
    vm->only_ioctls = ioctls != NULL && strcmp(ioctls, "1") == 0;
    int sync = vm->only_ioctls ? 0 : ioctl(vm->vm, KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS);
    if (sync > 0 && (sync & (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS))
            == (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS)) {
        vm->sync_regs = 1;
        vm->run->kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;
    }
    read_tsc_offset(vm);
    return vm;
err:
    kvmm_destroy(vm);
    return NULL;
}

static void segment(struct kvm_segment *s, uint16_t sel, int code)
{
    memset(s, 0, sizeof *s);
    s->limit = 0xffffffff;
    s->selector = sel;
    s->type = code ? 11 : 3;       /* execute/read accessed, read/write accessed */
    s->present = 1;
    s->dpl = 3;
    s->s = 1;
    s->l = code;
    s->db = !code;
    s->g = 1;
}

int kvmm_setup_long_mode(struct kvmm *vm, uint64_t entry, uint64_t stack)
{
    /* GDT: null, kernel code/data (unused), user data, user code64. The
     * hidden segment state below is what counts; the GDT keeps it honest. */
    uint64_t *gdt = (uint64_t *)(vm->mem + KEMARI_GDT_GPA);
    gdt[0] = 0;
    gdt[1] = 0x00af9a000000ffffULL;
    gdt[2] = 0x00cf92000000ffffULL;
    gdt[3] = 0x00cff2000000ffffULL;
    gdt[4] = 0x00affa000000ffffULL;

    /* Identity map of 4 GiB with 2 MiB user pages: PML4, PDPT, 4 PDs. */
    uint64_t pt = KEMARI_PAGE_TABLE_GPA;
    uint64_t *pml4 = (uint64_t *)(vm->mem + pt), *pdpt = (uint64_t *)(vm->mem + pt + 0x1000);
    memset(pml4, 0, 6 * KEMARI_PAGE_SIZE);
    pml4[0] = (pt + 0x1000) | 0x7;
    for (uint64_t i = 0; i < 4; i++) {
        uint64_t *pd = (uint64_t *)(vm->mem + pt + 0x2000 + i * 0x1000);
        pdpt[i] = (pt + 0x2000 + i * 0x1000) | 0x7;
        for (uint64_t j = 0; j < 512; j++)
            pd[j] = ((i << 30) + (j << 21)) | 0x87;   /* P | RW | US | PS */
    }
    kvmm_mark_dirty(vm, KEMARI_GDT_GPA, KEMARI_PAGE_SIZE);
    kvmm_mark_dirty(vm, pt, 6 * KEMARI_PAGE_SIZE);

    struct kvm_sregs s;
    if (ioctl(vm->vcpu, KVM_GET_SREGS, &s) < 0)
        return fail(errno, "KVM_GET_SREGS");
    segment(&s.cs, 0x20 | 3, 1);
    segment(&s.ds, 0x18 | 3, 0);
    s.es = s.fs = s.gs = s.ss = s.ds;
    s.gdt.base = KEMARI_GDT_GPA;
    s.gdt.limit = 5 * 8 - 1;
    s.cr3 = pt;
    s.cr4 = 0x20 | 0x200 | 0x400;           /* PAE | OSFXSR | OSXMMEXCPT */
    s.cr0 = 0x80050033;                     /* PG | AM | WP | NE | ET | MP | PE */
    s.efer = 0x500;                         /* LME | LMA */
    if (ioctl(vm->vcpu, KVM_SET_SREGS, &s) < 0)
        return fail(errno, "KVM_SET_SREGS");
    struct kvm_regs r = { .rip = entry, .rsp = stack, .rflags = 0x3002 };  /* IOPL 3 */
    vm->regs_synced = 0;
    if (ioctl(vm->vcpu, KVM_SET_REGS, &r) < 0)
        return fail(errno, "KVM_SET_REGS");
    return 0;
}

static uint64_t exit_rip(struct kvmm *vm)
{
    struct kvm_regs r;
    return ioctl(vm->vcpu, KVM_GET_REGS, &r) < 0 ? 0 : r.rip;
}

int kvmm_run(struct kvmm *vm, struct kvmm_exit *ex)
{
    if (!vm->thread_known) {
        vm->vcpu_thread = pthread_self();
        __atomic_store_n(&vm->thread_known, 1, __ATOMIC_RELEASE);
    }
    memset(ex, 0, sizeof *ex);
    vm->regs_synced = 0;
    vm->out_pending = 0;
    if (ioctl(vm->vcpu, KVM_RUN, 0) < 0) {
        if (errno == EINTR || errno == EAGAIN) {
            vm->regs_synced = vm->sync_regs;
            vm->run->immediate_exit = 0;
            ex->reason = KVMM_EXIT_KICKED;
            return 0;
        }
        return fail(errno, "KVM_RUN");
    }
    vm->regs_synced = vm->sync_regs;
    struct kvm_run *run = vm->run;
    switch (run->exit_reason) {
    case KVM_EXIT_IO: {
        ex->reason = KVMM_EXIT_IO;
        ex->io_dir = run->io.direction == KVM_EXIT_IO_OUT;
        ex->io_port = run->io.port;
        ex->io_size = run->io.size;
        ex->io_count = run->io.count;
        vm->out_pending = ex->io_dir && run->io.count == 1;
        if (ex->io_dir) {
            uint64_t v = 0;
            memcpy(&v, (uint8_t *)run + run->io.data_offset, run->io.size);
            ex->io_value = v;
        }
        break;
    }
    case KVM_EXIT_MMIO:
        ex->reason = KVMM_EXIT_MMIO;
        ex->mmio_addr = run->mmio.phys_addr;
        ex->mmio_len = run->mmio.len;
        ex->mmio_write = run->mmio.is_write;
        break;
    case KVM_EXIT_HLT:
        ex->reason = KVMM_EXIT_HLT;
        break;
    case KVM_EXIT_SHUTDOWN:
        ex->reason = KVMM_EXIT_SHUTDOWN;
        ex->rip = exit_rip(vm);
        break;
    case KVM_EXIT_INTERNAL_ERROR:
        ex->reason = KVMM_EXIT_INTERNAL;
        ex->suberror = run->internal.suberror;
        ex->rip = exit_rip(vm);
        break;
    case KVM_EXIT_INTR:
        ex->reason = KVMM_EXIT_KICKED;
        break;
    default:
        ex->reason = KVMM_EXIT_OTHER;
        ex->suberror = run->exit_reason;
        ex->rip = exit_rip(vm);
        break;
    }
    return 0;
}

/* Set the data an `in` instruction reads (call before the next run). */
int kvmm_set_in_value(struct kvmm *vm, uint64_t value)
{
    struct kvm_run *run = vm->run;
    if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_IN)
        return fail(0, "no pending `in` exit");
    memcpy((uint8_t *)run + run->io.data_offset, &value, run->io.size);
    return 0;
}

void kvmm_kick(struct kvmm *vm, int thread_signal)
{
    __atomic_store_n(&vm->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    if (thread_signal && __atomic_load_n(&vm->thread_known, __ATOMIC_ACQUIRE))
        pthread_kill(vm->vcpu_thread, KICK_SIGNAL);
}

void kvmm_clear_kick(struct kvmm *vm)
{
    __atomic_store_n(&vm->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
}

int kvmm_complete_pending(struct kvmm *vm)
{
    int at_out = vm->out_pending && vm->regs_synced;
    uint64_t rip = vm->run->s.regs.regs.rip;
    vm->out_pending = 0;
    vm->run->immediate_exit = 1;
    vm->regs_synced = 0;
    int r = ioctl(vm->vcpu, KVM_RUN, 0);
    int e = errno;
    vm->run->immediate_exit = 0;
    if (r == 0 || e != EINTR)
        return fail(r == 0 ? 0 : e, "KVM_RUN with immediate_exit did not return EINTR");
    vm->regs_synced = vm->sync_regs;
    if (at_out && vm->regs_synced) {
        if (vm->run->s.regs.regs.rip == rip)
            vm->out_noop_seen++;
        else
            vm->out_moved_seen++;
    }
    return 0;
}

int64_t kvmm_state_size(struct kvmm *vm)
{
    return sizeof(struct kvmm_state_hdr) + sizeof(struct kvm_regs) + sizeof(struct kvm_sregs)
        + sizeof(struct kvm_xcrs) + sizeof(struct kvm_vcpu_events) + sizeof(struct kvm_debugregs)
        + sizeof(struct kvm_mp_state) + sizeof(struct kvm_lapic_state) + vm->xsave_len
        + (uint64_t)vm->nmsrs * sizeof(struct kvm_msr_entry);
}

/* The order of the pieces in the blob is the order they must be restored in. */
#define BLOB_PIECES(X) \
    X(KVM_GET_SREGS, KVM_SET_SREGS, struct kvm_sregs) \
    X(KVM_GET_REGS, KVM_SET_REGS, struct kvm_regs) \
    X(KVM_GET_XCRS, KVM_SET_XCRS, struct kvm_xcrs)

/* sregs, regs, xsave, the TSC: what a CPL-3 guest changes (see vmm.h). */
static int get_fast_pieces(struct kvmm *vm, uint8_t *p)
{
    if (vm->regs_synced) {
        memcpy(p, &vm->run->s.regs.sregs, sizeof(struct kvm_sregs));
        memcpy(p + sizeof(struct kvm_sregs), &vm->run->s.regs.regs, sizeof(struct kvm_regs));
    } else if (ioctl(vm->vcpu, KVM_GET_SREGS, p) < 0
               || ioctl(vm->vcpu, KVM_GET_REGS, p + sizeof(struct kvm_sregs)) < 0) {
        return fail(errno, "KVM_GET_SREGS/REGS");
    }
    p += sizeof(struct kvm_sregs) + sizeof(struct kvm_regs);
    unsigned long xreq = vm->xsave_len > sizeof(struct kvm_xsave) ? KVM_GET_XSAVE2 : KVM_GET_XSAVE;
    if (ioctl(vm->vcpu, xreq, p) < 0)
        return fail(errno, "KVM_GET_XSAVE");
    p += vm->xsave_len;
    struct { struct kvm_msrs h; struct kvm_msr_entry e; } tsc = {
        .h.nmsrs = 1, .e.index = MSR_IA32_TSC,
    };
    if (vm->tsc_offset_known)
        tsc.e.data = __rdtsc() + vm->tsc_offset;     /* what KVM_GET_MSRS computes */
    else if (ioctl(vm->vcpu, KVM_GET_MSRS, &tsc) != 1)
        return fail(errno, "KVM_GET_MSRS(TSC)");
    memcpy(p, &tsc.e, sizeof tsc.e);
    return 0;
}

int64_t kvmm_get_state(struct kvmm *vm, uint8_t *buf, uint64_t len)
{
    int64_t need = kvmm_state_size(vm);
    if ((int64_t)len < need)
        return fail(ENOSPC, "state buffer too small (%lld < %lld)", (long long)len,
                    (long long)need);
    memset(buf, 0, need);
    struct kvmm_state_hdr *h = (struct kvmm_state_hdr *)buf;
    *h = (struct kvmm_state_hdr){ KVMM_STATE_MAGIC, KVMM_STATE_VERSION, (uint32_t)need,
                                  vm->nmsrs, vm->xsave_len, KVMM_STATE_FULL, {0} };
    uint8_t *p = buf + sizeof *h;
#define GET(get, set, type) \
    if (ioctl(vm->vcpu, get, p) < 0) return fail(errno, #get); \
    p += sizeof(type);
    BLOB_PIECES(GET)
#undef GET
    unsigned long xreq = vm->xsave_len > sizeof(struct kvm_xsave) ? KVM_GET_XSAVE2 : KVM_GET_XSAVE;
    if (ioctl(vm->vcpu, xreq, p) < 0)
        return fail(errno, "KVM_GET_XSAVE");
    p += vm->xsave_len;
    struct kvm_msrs *m = malloc(sizeof *m + vm->nmsrs * sizeof(struct kvm_msr_entry));
    if (!m)
        return fail(ENOMEM, "msrs");
    m->nmsrs = vm->nmsrs;
    m->pad = 0;
    for (uint32_t i = 0; i < vm->nmsrs; i++)
        m->entries[i] = (struct kvm_msr_entry){ .index = vm->msr_index[i] };
    int n = ioctl(vm->vcpu, KVM_GET_MSRS, m);
    if (n != (int)vm->nmsrs) {
        free(m);
        return fail(n < 0 ? errno : EIO, "KVM_GET_MSRS read %d of %u", n, vm->nmsrs);
    }
    memcpy(p, m->entries, vm->nmsrs * sizeof(struct kvm_msr_entry));
    p += vm->nmsrs * sizeof(struct kvm_msr_entry);
    free(m);
    if (ioctl(vm->vcpu, KVM_GET_LAPIC, p) < 0)
        return fail(errno, "KVM_GET_LAPIC");
    p += sizeof(struct kvm_lapic_state);
    if (ioctl(vm->vcpu, KVM_GET_VCPU_EVENTS, p) < 0)
        return fail(errno, "KVM_GET_VCPU_EVENTS");
    p += sizeof(struct kvm_vcpu_events);
    if (ioctl(vm->vcpu, KVM_GET_DEBUGREGS, p) < 0)
        return fail(errno, "KVM_GET_DEBUGREGS");
    p += sizeof(struct kvm_debugregs);
    if (ioctl(vm->vcpu, KVM_GET_MP_STATE, p) < 0)
        return fail(errno, "KVM_GET_MP_STATE");
    p += sizeof(struct kvm_mp_state);
    return p - buf;
}

#define FAST_SIZE(xlen) (sizeof(struct kvmm_state_hdr) + sizeof(struct kvm_sregs) \
    + sizeof(struct kvm_regs) + (xlen) + sizeof(struct kvm_msr_entry))

int64_t kvmm_get_state_fast(struct kvmm *vm, uint8_t *buf, uint64_t len)
{
    uint64_t need = FAST_SIZE(vm->xsave_len);
    if (len < need)
        return fail(ENOSPC, "state buffer too small");
    struct kvmm_state_hdr *h = (struct kvmm_state_hdr *)buf;
    *h = (struct kvmm_state_hdr){ KVMM_STATE_MAGIC, KVMM_STATE_VERSION, (uint32_t)need,
                                  1, vm->xsave_len, KVMM_STATE_FAST, {0} };
    int r = get_fast_pieces(vm, buf + sizeof *h);
    return r < 0 ? r : (int64_t)need;
}

int64_t kvmm_get_state_fast_at_out(struct kvmm *vm, uint8_t *buf, uint64_t len)
{
    if (!vm->out_pending || !vm->regs_synced || vm->out_noop_seen < OUT_NOOP_TRUSTED
            || vm->out_moved_seen)
        return 0;
    return kvmm_get_state_fast(vm, buf, len);
}

int kvmm_out_completion_moves_rip(struct kvmm *vm)
{
    return vm->out_moved_seen ? 1 : vm->out_noop_seen >= OUT_NOOP_TRUSTED ? 0 : -1;
}

/* KVM_SET_XSAVE takes a buffer of at least struct kvm_xsave; copy into one
 * of the size this host uses so that a smaller blob is still safe. */
static int set_xsave(struct kvmm *vm, const uint8_t *p, uint32_t len)
{
    uint32_t xlen = vm->xsave_len > len ? vm->xsave_len : len;
    uint8_t *x = calloc(1, xlen);
    if (!x)
        return fail(ENOMEM, "xsave");
    memcpy(x, p, len);
    int r = ioctl(vm->vcpu, KVM_SET_XSAVE, x);
    free(x);
    return r < 0 ? fail(errno, "KVM_SET_XSAVE") : 0;
}

static int set_state_fast(struct kvmm *vm, const struct kvmm_state_hdr *h, uint64_t len)
{
    if (h->nmsrs != 1 || h->xsave_len > 1u << 20 || len != FAST_SIZE(h->xsave_len)
        || h->total_len != len)
        return fail(0, "fast vCPU state blob is malformed");
    const uint8_t *p = (const uint8_t *)(h + 1);
    if (ioctl(vm->vcpu, KVM_SET_SREGS, p) < 0)
        return fail(errno, "KVM_SET_SREGS");
    p += sizeof(struct kvm_sregs);
    if (ioctl(vm->vcpu, KVM_SET_REGS, p) < 0)
        return fail(errno, "KVM_SET_REGS");
    p += sizeof(struct kvm_regs);
    int r = set_xsave(vm, p, h->xsave_len);
    if (r < 0)
        return r;
    p += h->xsave_len;
    struct { struct kvm_msrs h; struct kvm_msr_entry e; } tsc = { .h.nmsrs = 1 };
    memcpy(&tsc.e, p, sizeof tsc.e);
    if (tsc.e.index != MSR_IA32_TSC || ioctl(vm->vcpu, KVM_SET_MSRS, &tsc) != 1)
        return fail(errno, "KVM_SET_MSRS(TSC)");
    return 0;
}

static int set_state(struct kvmm *vm, const uint8_t *buf, uint64_t len)
{
    const struct kvmm_state_hdr *h = (const struct kvmm_state_hdr *)buf;
    if (len < sizeof *h || h->magic != KVMM_STATE_MAGIC)
        return fail(0, "not a Kemari vCPU state blob");
    if (h->version != KVMM_STATE_VERSION)
        return fail(0, "vCPU state version %u, this build reads %u", h->version,
                    KVMM_STATE_VERSION);
    if (h->kind == KVMM_STATE_FAST)
        return set_state_fast(vm, h, len);
    if (h->kind != KVMM_STATE_FULL)
        return fail(0, "vCPU state blob of unknown kind %u", h->kind);
    if (h->total_len != len || h->xsave_len > 1u << 20 || h->nmsrs > MAX_MSRS)
        return fail(0, "vCPU state blob is malformed (length %llu, header says %u)",
                    (unsigned long long)len, h->total_len);
    uint64_t need = sizeof *h + sizeof(struct kvm_regs) + sizeof(struct kvm_sregs)
        + sizeof(struct kvm_xcrs) + sizeof(struct kvm_vcpu_events) + sizeof(struct kvm_debugregs)
        + sizeof(struct kvm_mp_state) + sizeof(struct kvm_lapic_state) + h->xsave_len
        + (uint64_t)h->nmsrs * sizeof(struct kvm_msr_entry);
    if (need != len)
        return fail(0, "vCPU state blob length mismatch (%llu != %llu)",
                    (unsigned long long)len, (unsigned long long)need);
    const uint8_t *p = buf + sizeof *h;
#define SET(get, set, type) \
    if (ioctl(vm->vcpu, set, p) < 0) return fail(errno, #set); \
    p += sizeof(type);
    BLOB_PIECES(SET)
#undef SET
    int r = set_xsave(vm, p, h->xsave_len);
    if (r < 0)
        return r;
    p += h->xsave_len;
    struct kvm_msrs *m = malloc(sizeof *m + h->nmsrs * sizeof(struct kvm_msr_entry));
    if (!m)
        return fail(ENOMEM, "msrs");
    m->nmsrs = h->nmsrs;
    m->pad = 0;
    memcpy(m->entries, p, h->nmsrs * sizeof(struct kvm_msr_entry));
    int n = ioctl(vm->vcpu, KVM_SET_MSRS, m);
    uint32_t bad = n >= 0 && n < (int)h->nmsrs ? m->entries[n].index : 0;
    free(m);
    if (n != (int)h->nmsrs)
        return fail(n < 0 ? errno : EIO, "KVM_SET_MSRS set %d of %u (MSR %#x refused)", n,
                    h->nmsrs, bad);
    p += h->nmsrs * sizeof(struct kvm_msr_entry);
    if (ioctl(vm->vcpu, KVM_SET_LAPIC, p) < 0)
        return fail(errno, "KVM_SET_LAPIC");
    p += sizeof(struct kvm_lapic_state);
    if (ioctl(vm->vcpu, KVM_SET_VCPU_EVENTS, p) < 0)
        return fail(errno, "KVM_SET_VCPU_EVENTS");
    p += sizeof(struct kvm_vcpu_events);
    if (ioctl(vm->vcpu, KVM_SET_DEBUGREGS, p) < 0)
        return fail(errno, "KVM_SET_DEBUGREGS");
    p += sizeof(struct kvm_debugregs);
    if (ioctl(vm->vcpu, KVM_SET_MP_STATE, p) < 0)
        return fail(errno, "KVM_SET_MP_STATE");
    return 0;
}

int kvmm_set_state(struct kvmm *vm, const uint8_t *buf, uint64_t len)
{
    vm->regs_synced = 0;
    int r = set_state(vm, buf, len);
    read_tsc_offset(vm);       /* a restored TSC moves the offset */
    return r;
}

/* ---- dirty tracking ---------------------------------------------------- */

static int hot_pages_start(struct hot_pages *hot, uint64_t npages, uint64_t words,
                           uint32_t max)
{
    hot->max = max < KVMM_HOT_MAX_PAGES ? max : KVMM_HOT_MAX_PAGES;
    hot->count = hot->harvests = 0;
    if (!hot->max)
        return 0;
    if (!hot->last_written)
        hot->last_written = malloc(npages * sizeof *hot->last_written);
    if (!hot->keep)
        hot->keep = malloc(words * 8);
    if (!hot->last_written || !hot->keep)
        return fail(ENOMEM, "hot page maps");
    memset(hot->last_written, 0, npages * sizeof *hot->last_written);
    memset(hot->keep, 0, words * 8);
    return 0;
}

int kvmm_dirty_start(struct kvmm *vm, uint32_t hot_pages)
{
    if (vm->tracking)
        return 0;
    int r = hot_pages_start(&vm->hot, vm->npages, vm->bitmap_words, hot_pages);
    if (r < 0)
        return r;
    r = set_slot(vm, vm->slot_flags | KVM_MEM_LOG_DIRTY_PAGES);
    if (r < 0)
        return r;
    memset(vm->vmm_bitmap, 0, vm->bitmap_words * 8);
    memset(vm->pending_bitmap, 0, vm->bitmap_words * 8);
    vm->tracking = 1;
    return 0;
}

/* A harvest's turn of the hot-page policy, on the log KVM just returned:
 * expire old hot pages, admit pages written again soon, and leave in
 * clear[] what the harvest re-protects. */
static void hot_pages_update(struct hot_pages *hot, const uint64_t *dirty, uint64_t *clear,
                             uint64_t words)
{
    uint16_t now = ++hot->harvests ? hot->harvests : ++hot->harvests;
    for (uint32_t i = 0; i < hot->count;) {
        if ((uint16_t)(now - hot->since[i]) < KVMM_HOT_LIFETIME) {
            i++;
            continue;
        }
        uint64_t pfn = hot->pfn[i];
        hot->keep[pfn / 64] &= ~(1ULL << (pfn % 64));
        hot->last_written[pfn] = 0;     /* must be written again to rejoin */
        hot->count--;
        hot->pfn[i] = hot->pfn[hot->count];
        hot->since[i] = hot->since[hot->count];
    }
    for (uint64_t w = 0; w < words; w++) {
        uint64_t b = dirty[w] & ~hot->keep[w];
        clear[w] = b;
        /* The first harvest reports every page: it says nothing about writes. */
        for (; b && now > 1; b &= b - 1) {
            uint64_t pfn = w * 64 + __builtin_ctzll(b);
            uint16_t last = hot->last_written[pfn];
            hot->last_written[pfn] = now;
            if (last && (uint16_t)(now - last) <= KVMM_HOT_WINDOW && hot->count < hot->max) {
                hot->keep[w] |= 1ULL << (pfn % 64);
                clear[w] &= ~(1ULL << (pfn % 64));
                hot->pfn[hot->count] = pfn;
                hot->since[hot->count++] = now;
            }
        }
    }
}

int kvmm_dirty_stop(struct kvmm *vm)
{
    if (!vm->tracking)
        return 0;
    vm->tracking = 0;
    return set_slot(vm, vm->slot_flags & ~KVM_MEM_LOG_DIRTY_PAGES);
}

int kvmm_dirty_tracking(struct kvmm *vm) { return vm->tracking; }

void kvmm_mark_dirty(struct kvmm *vm, uint64_t gpa, uint64_t len)
{
    if (!len || gpa >= vm->mem_bytes)
        return;
    uint64_t last = gpa + len - 1 < vm->mem_bytes ? gpa + len - 1 : vm->mem_bytes - 1;
    /* Atomic: a full-sync thread may harvest while the loop thread writes. */
    for (uint64_t pfn = gpa / KEMARI_PAGE_SIZE; pfn <= last / KEMARI_PAGE_SIZE; pfn++)
        __atomic_fetch_or(&vm->vmm_bitmap[pfn / 64], 1ULL << (pfn % 64), __ATOMIC_RELAXED);
}

int kvmm_write(struct kvmm *vm, uint64_t gpa, const void *src, uint64_t len)
{
    if (gpa > vm->mem_bytes || len > vm->mem_bytes - gpa)
        return fail(0, "write of %llu bytes at %#llx is outside guest memory",
                    (unsigned long long)len, (unsigned long long)gpa);
    memcpy(vm->mem + gpa, src, len);
    kvmm_mark_dirty(vm, gpa, len);
    return 0;
}

int64_t kvmm_dirty_harvest(struct kvmm *vm, uint64_t *pfns, uint64_t max)
{
    if (!vm->tracking)
        return fail(0, "dirty tracking is not started");
    struct kvm_dirty_log log = { .slot = 0, .dirty_bitmap = vm->kvm_bitmap };
    if (ioctl(vm->vm, KVM_GET_DIRTY_LOG, &log) < 0)
        return fail(errno, "KVM_GET_DIRTY_LOG");
    uint64_t *clear = vm->kvm_bitmap;
    if (vm->hot.max) {
        clear = vm->clear_bitmap;
        hot_pages_update(&vm->hot, vm->kvm_bitmap, clear, vm->bitmap_words);
    }
    uint64_t any = 0;
    for (uint64_t w = 0; w < vm->bitmap_words; w++)
        any |= clear[w];
    if (any) {
        /* Re-protect exactly what we are about to hand out, hot pages aside. */
        struct kvm_clear_dirty_log clr = {
            .slot = 0, .first_page = 0, .num_pages = (uint32_t)vm->npages,
            .dirty_bitmap = clear,
        };
        if (ioctl(vm->vm, KVM_CLEAR_DIRTY_LOG, &clr) < 0)
            return fail(errno, "KVM_CLEAR_DIRTY_LOG");
    }
    uint64_t count = 0;
    for (uint64_t w = 0; w < vm->bitmap_words; w++) {
        vm->pending_bitmap[w] |= vm->kvm_bitmap[w]
            | __atomic_exchange_n(&vm->vmm_bitmap[w], 0, __ATOMIC_RELAXED);
        count += __builtin_popcountll(vm->pending_bitmap[w]);
    }
    if (count > max)
        return fail(ENOSPC, "%llu dirty pages, room for %llu", (unsigned long long)count,
                    (unsigned long long)max);
    uint64_t n = 0;
    for (uint64_t w = 0; w < vm->bitmap_words; w++) {
        uint64_t b = vm->pending_bitmap[w];
        while (b) {
            pfns[n++] = w * 64 + __builtin_ctzll(b);
            b &= b - 1;
        }
        vm->pending_bitmap[w] = 0;
    }
    return (int64_t)n;
}

static int check_pfns(struct kvmm *vm, const uint64_t *pfns, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        if (pfns[i] >= vm->npages)
            return fail(0, "page %llu is outside guest memory (%llu pages)",
                        (unsigned long long)pfns[i], (unsigned long long)vm->npages);
    return 0;
}

int kvmm_gather_pages(struct kvmm *vm, const uint64_t *pfns, uint64_t n, uint8_t *out)
{
    int r = check_pfns(vm, pfns, n);
    if (r < 0)
        return r;
    for (uint64_t i = 0; i < n; i++)
        memcpy(out + i * KEMARI_PAGE_SIZE, vm->mem + pfns[i] * KEMARI_PAGE_SIZE,
               KEMARI_PAGE_SIZE);
    return 0;
}

int kvmm_scatter_pages(struct kvmm *vm, const uint64_t *pfns, uint64_t n, const uint8_t *in)
{
    int r = check_pfns(vm, pfns, n);
    if (r < 0)
        return r;
    for (uint64_t i = 0; i < n; i++) {
        memcpy(vm->mem + pfns[i] * KEMARI_PAGE_SIZE, in + i * KEMARI_PAGE_SIZE,
               KEMARI_PAGE_SIZE);
        kvmm_mark_dirty(vm, pfns[i] * KEMARI_PAGE_SIZE, KEMARI_PAGE_SIZE);
    }
    return 0;
}

static int page_is_zero(const uint8_t *p)
{
    const uint64_t *w = (const uint64_t *)p;
    for (int i = 0; i < KEMARI_PAGE_SIZE / 8; i++)
        if (w[i])
            return 0;
    return 1;
}

int64_t kvmm_nonzero_pages(struct kvmm *vm, uint64_t *pfns, uint64_t max)
{
    uint64_t n = 0;
    for (uint64_t pfn = 0; pfn < vm->npages; pfn++) {
        if (page_is_zero(vm->mem + pfn * KEMARI_PAGE_SIZE))
            continue;
        if (n == max)
            return fail(ENOSPC, "more than %llu non-zero pages", (unsigned long long)max);
        pfns[n++] = pfn;
    }
    return (int64_t)n;
}
