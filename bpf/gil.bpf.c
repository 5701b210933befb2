/* otel-gil: every GIL wait and hold of the traced processes, timed in the kernel.
 *
 * Probes (attached per target pid by otel_gil/probes.py):
 *   on_take_gil         take_gil entry (every copy): a wait begins.
 *   on_take_gil_return  each `ret` instruction of take_gil: the GIL is held.
 *                       Plain uprobes at the ret offsets, not uretprobes: those
 *                       rewrite the return address and need the uretprobe()
 *                       syscall, which seccomp profiles kill (correlation.md).
 *   on_cond_signal      libc pthread_cond_signal, filtered on the GIL's
 *                       condition variable: drop_gil does `locked = 0;
 *                       COND_SIGNAL(gil->cond)` in every CPython 3.8..3.14
 *                       (Python/ceval_gil.[ch]), so this sees every release,
 *                       even where LTO inlined drop_gil into its callers.
 *   sched_process_exit  a thread ended: mark it, so user space can reap it.
 *
 * Compile-time settings (-D, set by the loader from ProbeConfig, whose
 * defaults the ones below repeat, for compiling this file on its own;
 * tests/test_probe_config.py keeps the two equal): WAIT_THRESHOLD_NS,
 * HOLD_THRESHOLD_NS, MAX_THREADS, MAX_TARGETS, RINGBUF_PAGES, and
 * EMPTY_PROBES, which makes every uprobe return at once: the cost floor that
 * bench/overhead.py compares the real probes against, and SIDECAR_PIDNS_DEV /
 * SIDECAR_PIDNS_INO when the sidecar runs in a child PID namespace (a sidecar
 * container sharing the app pod's namespace): then every pid and tid here is
 * the one the sidecar sees, not the host's.
 */
#include <uapi/linux/ptrace.h> /* struct pt_regs: the stable x86-64 uapi layout */
#include "gil.h"

#ifndef WAIT_THRESHOLD_NS
#define WAIT_THRESHOLD_NS 1000000ULL
#endif
#ifndef HOLD_THRESHOLD_NS
#define HOLD_THRESHOLD_NS 50000000ULL
#endif
#ifndef MAX_THREADS
#define MAX_THREADS 8192
#endif
#ifndef MAX_TARGETS
#define MAX_TARGETS 256
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 256 /* 1 MiB */
#endif
#ifdef EMPTY_PROBES
#define FLOOR_ONLY() return 0
#else
#define FLOOR_ONLY() do {} while (0)
#endif

BPF_HASH(targets, u32, struct target, MAX_TARGETS);
BPF_HASH(threads, u32, struct thread_stats, MAX_THREADS);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
/* Scratch for building a new thread's entry: too large for the BPF stack. */
BPF_PERCPU_ARRAY(zero_thread, struct thread_stats, 1);

/* The current process and thread, as the sidecar sees them. -1: a task the
 * sidecar cannot see, so not one of its targets. */
static __always_inline int current_ids(u32 *pid, u32 *tid)
{
#ifdef SIDECAR_PIDNS_INO
    struct bpf_pidns_info ns = {};
    if (bpf_get_ns_current_pid_tgid(SIDECAR_PIDNS_DEV, SIDECAR_PIDNS_INO, &ns, sizeof(ns)))
        return -1;
    *pid = ns.tgid;
    *tid = ns.pid;
#else
    u64 id = bpf_get_current_pid_tgid();
    *pid = id >> 32;
    *tid = (u32)id;
#endif
    return 0;
}

/* Bucket of a duration: see gil.h; mirrored by otel_gil.timeline.bucket_of. */
static __always_inline u32 bucket_of(u64 ns)
{
    if (ns < (1ULL << GIL_HIST_MIN_SHIFT))
        return 0;
    u32 e = 0;
    u64 v = ns;
    if (v >> 32) { v >>= 32; e += 32; }
    if (v >> 16) { v >>= 16; e += 16; }
    if (v >> 8) { v >>= 8; e += 8; }
    if (v >> 4) { v >>= 4; e += 4; }
    if (v >> 2) { v >>= 2; e += 2; }
    if (v >> 1) { e += 1; }
    u32 sub = (ns >> (e - 2)) & 3;
    u32 b = 1 + (e - GIL_HIST_MIN_SHIFT) * 4 + sub;
    if (b >= GIL_HIST_BUCKETS)
        b = GIL_HIST_BUCKETS - 1;
    /* Hide b's range from clang so the mask below survives: without it clang
     * drops the mask as redundant, and the verifier, tracking registers
     * differently, rejects the array index. GIL_HIST_BUCKETS is a power of 2. */
    asm volatile("" : "+r"(b));
    return b & (GIL_HIST_BUCKETS - 1);
}

/* The thread's entry, created on first sight. NULL when the map is full. */
static __always_inline struct thread_stats *thread_of(u32 tid, u32 pid, struct target *t)
{
    struct thread_stats *th = threads.lookup(&tid);
    if (th)
        return th;
    int zero = 0;
    struct thread_stats *init = zero_thread.lookup(&zero);
    if (!init)
        return 0;
    init->pid = pid;
    if (threads.insert(&tid, init) != 0) {
        __sync_fetch_and_add(&t->untracked, 1);
        return 0;
    }
    return threads.lookup(&tid);
}

/* Copy the calling thread's published span context, if the app has a context
 * table. Only ever called for the current thread, which is stopped in the
 * probe, so its slot cannot change under us. */
static __always_inline void read_ctx(struct target *t, u32 tid, struct thread_ctx *out)
{
    if (!t->ctx_table)
        return;
    u32 key = tid;
    if (t->ns_translate) {
        struct bpf_pidns_info ns = {};
        if (bpf_get_ns_current_pid_tgid(t->ns_dev, t->ns_ino, &ns, sizeof(ns)))
            return;
        key = ns.pid;
    }
    u32 mask = t->ctx_slots - 1;
#pragma unroll
    for (int k = 0; k < GIL_CTX_PROBES; k++) {
        u64 addr = t->ctx_table + GIL_CTX_HEADER_SIZE
                   + (u64)((key + k) & mask) * GIL_CTX_SLOT_SIZE;
        struct ctx_slot_head head;
        if (bpf_probe_read_user(&head, sizeof(head), (void *)addr))
            return;
        if (head.tid == key) {
            if (head.ctx.valid)
                __builtin_memcpy(out, &head.ctx, sizeof(*out));
            return;
        }
        if (head.tid == 0)
            return;
    }
}

int on_take_gil(struct pt_regs *ctx)
{
    FLOOR_ONLY();
    u32 pid, tid;
    if (current_ids(&pid, &tid))
        return 0;
    struct target *t = targets.lookup(&pid);
    if (!t)
        return 0;
    struct thread_stats *th = thread_of(tid, pid, t);
    if (!th)
        return 0;
    /* Holding while asking for the GIL means we missed this thread's release
     * (CPython would abort otherwise): drop the hold rather than invent one. */
    if (th->hold_start) {
        th->hold_start = 0;
        th->unmatched++;
    }
    th->wait_seq = t->acq_seq;
    th->wait_start = bpf_ktime_get_ns();
    return 0;
}

/* Emit a wait event, with the holds that overlapped [start, now]. */
static __always_inline void emit_wait(struct target *t, struct thread_stats *th,
                                      u32 pid, u32 tid, u64 start, u64 now)
{
    struct gil_event *ev = events.ringbuf_reserve(sizeof(struct gil_event));
    if (!ev) {
        __sync_fetch_and_add(&t->lost, 1);
        return;
    }
    ev->kind = GIL_EVENT_WAIT;
    ev->pid = pid;
    ev->tid = tid;
    ev->start_ns = start;
    ev->end_ns = now;
    ev->holds_total = t->acq_seq - th->wait_seq;
    __builtin_memset(&ev->ctx, 0, sizeof(ev->ctx));
    read_ctx(t, tid, &ev->ctx);
    u32 n = 0;
    u64 head = t->releases;
#pragma unroll
    for (int i = 1; i <= GIL_MAX_HOLDERS && i <= GIL_HOLD_RING; i++) {
        if (head < (u64)i)
            break;
        struct gil_hold *h = &t->ring[(head - i) & (GIL_HOLD_RING - 1)];
        if (h->end_ns <= start)
            break;
        __builtin_memcpy(&ev->holds[n & (GIL_MAX_HOLDERS - 1)], h, sizeof(*h));
        n++;
    }
    ev->nholds = n;
    events.ringbuf_submit(ev, 0);
}

int on_take_gil_return(struct pt_regs *ctx)
{
    FLOOR_ONLY();
    u64 now = bpf_ktime_get_ns();
    u32 pid, tid;
    if (current_ids(&pid, &tid))
        return 0;
    struct target *t = targets.lookup(&pid);
    if (!t)
        return 0;
    struct thread_stats *th = thread_of(tid, pid, t);
    if (!th)
        return 0;
    u64 start = th->wait_start;
    if (start) {
        u64 wait = now - start;
        th->wait_ns += wait;
        if (wait > th->max_wait_ns)
            th->max_wait_ns = wait;
        th->wait_hist[bucket_of(wait)]++;
        if (wait >= WAIT_THRESHOLD_NS)
            emit_wait(t, th, pid, tid, start, now);
    } else {
        th->unmatched++; /* the wait began before we attached */
    }
    th->wait_start = 0;
    th->hold_start = now;
    if (t->ctx_table) {
        __builtin_memset(&th->hold_ctx, 0, sizeof(th->hold_ctx));
        read_ctx(t, tid, &th->hold_ctx);
    }
    th->acquisitions++;
    if (t->holder_tid != tid) {
        t->handoffs++;
        /* Forced: CPython asks a holder to drop only after a waiter's timed
         * wait of one switch interval expired (take_gil, ceval_gil.c), so a
         * hand-off after a hold or a wait of at least the interval counts. */
        struct gil_hold *last = &t->ring[(t->releases - 1) & (GIL_HOLD_RING - 1)];
        if ((start && now - start >= t->interval_ns) ||
            (t->releases && last->end_ns - last->start_ns >= t->interval_ns))
            t->forced_switches++;
    }
    t->holder_tid = tid;
    t->acq_seq++;
    return 0;
}

/* Did the thread's span change between two context reads? */
static __always_inline int span_changed(struct thread_ctx *a, struct thread_ctx *b)
{
    u64 x, y;
    __builtin_memcpy(&x, a->span_id, sizeof(x));
    __builtin_memcpy(&y, b->span_id, sizeof(y));
    return x != y || a->valid != b->valid;
}

/* End the thread's hold at `now`: totals and histogram. Returns its length. */
static __always_inline u64 end_hold(struct thread_stats *th, u64 now)
{
    u64 hold = now - th->hold_start;
    th->hold_ns += hold;
    if (hold > th->max_hold_ns)
        th->max_hold_ns = hold;
    th->hold_hist[bucket_of(hold)]++;
    th->hold_start = 0;
    return hold;
}

/* h->ctx is the holder's context when it took the GIL; at_release, when it let go. */
static __always_inline void emit_hold(struct target *t, struct gil_hold *h, u32 pid,
                                      struct thread_ctx *at_release)
{
    struct gil_event *ev = events.ringbuf_reserve(sizeof(struct gil_event));
    if (!ev) {
        __sync_fetch_and_add(&t->lost, 1);
        return;
    }
    ev->kind = GIL_EVENT_HOLD;
    ev->pid = pid;
    ev->tid = h->tid;
    ev->nholds = 0;
    ev->start_ns = h->start_ns;
    ev->end_ns = h->end_ns;
    ev->holds_total = 0;
    __builtin_memcpy(&ev->ctx, at_release, sizeof(ev->ctx));
    ev->span_changed = span_changed(&h->ctx, at_release);
    events.ringbuf_submit(ev, 0);
}

int on_cond_signal(struct pt_regs *ctx)
{
    FLOOR_ONLY();
    u32 pid, tid;
    if (current_ids(&pid, &tid))
        return 0;
    struct target *t = targets.lookup(&pid);
    if (!t || PT_REGS_PARM1(ctx) != t->cond_addr)
        return 0;
    u64 now = bpf_ktime_get_ns();
    struct thread_stats *th = threads.lookup(&tid);
    if (!th || !th->hold_start) {
        /* A waiter inside take_gil is not releasing: glibc's timed wait calls
         * pthread_cond_signal itself to pass on a wake-up it consumed but
         * gave up on (__condvar_cancel_waiting, nptl/pthread_cond_wait.c),
         * and that internal call hits this probe too. Otherwise the GIL was
         * held since before we attached: no interval to report. */
        if (th && !th->wait_start)
            th->unmatched++;
        return 0;
    }
    /* The ring keeps the context read when the hold began (on_take_gil_return):
     * one read of the app's table per hand-off, not two. The context at
     * release is read only for the rare hold long enough to become an event. */
    struct gil_hold *h = &t->ring[t->releases & (GIL_HOLD_RING - 1)];
    h->tid = tid;
    h->start_ns = th->hold_start;
    h->end_ns = now;
    __builtin_memcpy(&h->ctx, &th->hold_ctx, sizeof(h->ctx));
    t->releases++;
    if (end_hold(th, now) >= HOLD_THRESHOLD_NS) {
        struct thread_ctx at_release = {};
        read_ctx(t, tid, &at_release);
        emit_hold(t, h, pid, &at_release);
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u32 pid, tid;
    if (current_ids(&pid, &tid))
        return 0;
    struct thread_stats *th = threads.lookup(&tid);
    if (!th)
        return 0;
    /* A process exits holding the GIL (Py_Finalize never drops it): that
     * hold ends here. A thread can also die inside take_gil (finalization,
     * PyThread_exit_thread): that wait never ends, so it is not counted. */
    if (th->hold_start)
        end_hold(th, bpf_ktime_get_ns());
    th->exited = 1;
    th->wait_start = 0;
    return 0;
}
