/* otel-gil: the GIL waits and holds of the traced processes, timed in the kernel.
 *
 * Two probe sets; otel_gil/disasm.py finds the sites in each build with
 * capstone, otel_gil/probes.py attaches them per target pid. bench/README.md
 * has the cost of each probe and how many fire per transition.
 *
 * contended (the default): only code that runs when a thread must wait.
 *   on_wait     each `call pthread_cond_timedwait` in take_gil: a timed wait on
 *               gil->cond begins. The caller holds gil->mutex.
 *   on_wake     the first emulated instruction after that call returns, rax
 *               still its result. The waiter holds gil->mutex again, so
 *               gil->locked, last_holder and switch_number are stable while
 *               it reads them: take_gil and drop_gil change them only under
 *               the mutex (Python/ceval_gil.[ch], 3.8 to 3.14).
 *   An acquisition that finds the GIL free, and every release, run no probe.
 *   Waits are exact; who held the GIL meanwhile is what the waiters saw at
 *   each wake-up (a timed wait returns at least every switch interval).
 *
 * all: the contended probes, plus
 *   on_held     an emulated instruction after MUTEX_UNLOCK(gil->mutex) on the
 *               path to take_gil's ret (the ret itself where a build has none):
 *               the GIL is held.
 *   on_release  each direct `call pthread_cond_signal` in the interpreter
 *               outside take_gil, kept when rdi is the GIL's cond: drop_gil does
 *               `locked = 0; COND_SIGNAL(gil->cond)` in every CPython 3.8 to
 *               3.14, so this sees every release, even where LTO inlined
 *               drop_gil into its callers. (Where the build has no such call,
 *               libc's pthread_cond_signal entry, with the same filter.)
 *   on_take_gil take_gil entry: only where a build has no timed-wait call site,
 *               as the start of every wait.
 *
 *   sched_process_exit  a thread ended: mark it, so user space can reap it.
 *
 * Compile-time settings (-D, set by the loader from ProbeConfig, whose
 * defaults the ones below repeat, for compiling this file on its own;
 * tests/test_probe_config.py keeps the two equal): PROBES_ALL, WAIT_THRESHOLD_NS,
 * HOLD_THRESHOLD_NS, MAX_THREADS, MAX_TARGETS, RINGBUF_PAGES, and
 * STACK_THRESHOLD_NS, NO_STACKS (no holder stacks: no sched_switch or
 * perf-sample program), EMPTY_PROBES, which makes every uprobe return at once: the cost floor that
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
#ifndef STACK_THRESHOLD_NS
#define STACK_THRESHOLD_NS 10000000ULL
#endif
#ifndef MAX_STACKS
#define MAX_STACKS 1024
#endif
#ifndef MAX_THREADS
#define MAX_THREADS 8192
#endif
#ifndef MAX_TARGETS
#define MAX_TARGETS 256
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 1024 /* 4 MiB */
#endif
#ifdef EMPTY_PROBES
#define FLOOR_ONLY() return 0
#else
#define FLOOR_ONLY() do {} while (0)
#endif
#ifdef PROBES_ALL
#define PROBE_SET GIL_SET_ALL
#else
#define PROBE_SET GIL_SET_CONTENDED
#endif
#define ETIMEDOUT_ 110 /* asm-generic/errno.h: what pthread_cond_timedwait returns */

BPF_HASH(targets, u32, struct target, MAX_TARGETS);
/* Bit `pid` set for each target's pid, by user space before it attaches
 * (probes/holders.py mark_target). The tracepoints run at every context switch
 * and exit of the machine: an inlined array read turns other processes away
 * for less than a hash lookup of `targets` (~0.1 µs here). */
BPF_ARRAY(target_pids, u64, GIL_PID_WORDS);
BPF_HASH(threads, u32, struct thread_stats, MAX_THREADS);
BPF_HASH(holders, u64, struct holder_stats, MAX_THREADS);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
/* Scratch for building a new thread's entry: too large for the BPF stack. */
BPF_PERCPU_ARRAY(zero_thread, struct thread_stats, 1);
/* The kernel's frame-pointer walks of holder stacks (struct gil_stack.user_stack_id). */
BPF_STACK_TRACE(stacks, MAX_STACKS);

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

/* Whether pid may be a target's (see target_pids): 0 rules it out. */
static __always_inline int maybe_target(u32 pid)
{
    u32 word = pid / 64;
    u64 *bits = target_pids.lookup(&word);
    return bits && (*bits >> (pid % 64)) & 1;
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

/* The calling thread's tid in the target's PID namespace (its context-table key). */
static __always_inline u32 own_ns_tid(struct target *t, u32 tid)
{
    if (!t->ns_translate)
        return tid;
    struct bpf_pidns_info ns = {};
    if (bpf_get_ns_current_pid_tgid(t->ns_dev, t->ns_ino, &ns, sizeof(ns)))
        return 0;
    return ns.pid;
}

/* Two context records byte for byte (28 bytes: no memcmp in BPF). */
static __always_inline int ctx_equal(struct thread_ctx *a, struct thread_ctx *b)
{
    u64 a0, a1, a2, b0, b1, b2;
    u32 a3, b3;
    __builtin_memcpy(&a0, a->trace_id, 8);
    __builtin_memcpy(&a1, a->trace_id + 8, 8);
    __builtin_memcpy(&a2, a->span_id, 8);
    __builtin_memcpy(&a3, &a->valid, 4);
    __builtin_memcpy(&b0, b->trace_id, 8);
    __builtin_memcpy(&b1, b->trace_id + 8, 8);
    __builtin_memcpy(&b2, b->span_id, 8);
    __builtin_memcpy(&b3, &b->valid, 4);
    return a0 == b0 && a1 == b1 && a2 == b2 && a3 == b3;
}

/* Copy the published span context of the thread with this ns tid, if the app
 * has a context table. The calling thread's own slot cannot change under us
 * (it is stopped in the probe). Another thread's can, if it runs Python on
 * another CPU: it holds the GIL then, and writes its slot at each
 * attach/detach. So such a slot is read twice and kept only if both reads
 * agree; a torn read is counted and the context left empty. */
static __always_inline void read_ctx_of(struct target *t, u32 key, int other,
                                        struct thread_ctx *out)
{
    if (!t->ctx_table || !key)
        return;
    u32 mask = t->ctx_slots - 1;
#pragma unroll
    for (int k = 0; k < GIL_CTX_PROBES; k++) {
        u64 addr = t->ctx_table + GIL_CTX_HEADER_SIZE
                   + (u64)((key + k) & mask) * GIL_CTX_SLOT_SIZE;
        struct ctx_slot_head head;
        if (bpf_probe_read_user(&head, sizeof(head), (void *)addr))
            return;
        if (head.tid == key) {
            if (!head.ctx.valid)
                return;
            if (other) {
                struct thread_ctx again;
                if (bpf_probe_read_user(&again, sizeof(again),
                                        (void *)(addr + __builtin_offsetof(struct ctx_slot_head,
                                                                           ctx))) ||
                    !ctx_equal(&again, &head.ctx)) {
                    __sync_fetch_and_add(&t->torn_reads, 1);
                    return;
                }
            }
            __builtin_memcpy(out, &head.ctx, sizeof(*out));
            return;
        }
        if (head.tid == 0)
            return;
    }
}

static __always_inline void read_ctx(struct target *t, u32 tid, struct thread_ctx *out)
{
    if (t->ctx_table)
        read_ctx_of(t, own_ns_tid(t, tid), 0, out);
}

/* ------------------------------------------------------------------ waits */

/* Events are submitted with BPF_RB_NO_WAKEUP: waking the reader is an
 * irq_work self-IPI in the traced thread (a VM exit under KVM, ~20 µs per
 * event here); user space consumes on its own schedule instead (probes.py). */

/* Emit a wait event, with the holds in the ring that overlapped [start, now]. */
static __always_inline void emit_wait(struct target *t, struct thread_stats *th,
                                      u32 pid, u32 tid, u64 start, u64 now, u64 seq_now)
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
    ev->holds_total = seq_now - th->wait_seq;
    ev->span_changed = 0;
    ev->probe_set = PROBE_SET;
    ev->flags = 0;
    ev->pad = 0;
    ev->stack_seq = 0;
    ev->pad2 = 0;
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
    events.ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
}

/* The thread's wait ends at `now` (it has the GIL, or is about to). */
static __always_inline void end_wait(struct target *t, struct thread_stats *th,
                                     u32 pid, u32 tid, u64 now, u64 seq_now)
{
    u64 start = th->wait_start;
    if (!start)
        return;
    u64 wait = now - start;
    th->wait_ns += wait;
    th->waits++;
    if (wait > th->max_wait_ns)
        th->max_wait_ns = wait;
    th->wait_hist[bucket_of(wait)]++;
    if (wait >= WAIT_THRESHOLD_NS)
        emit_wait(t, th, pid, tid, start, now, seq_now);
    th->wait_start = 0;
#ifndef PROBES_ALL
    if (t->waiting)
        __sync_fetch_and_add(&t->waiting, -1);
#endif
}

/* What a waiter reads of the GIL struct, holding gil->mutex: last_holder,
 * locked and switch_number are adjacent in every version's
 * _gil_runtime_state (otel_gil/probes/holders.py places off_holder 8 bytes
 * before off_locked, off_switch 8 after), so they are one read. */
struct gil_view {
    u64 last_holder;
    u32 locked;
    u32 pad;
    u64 switch_number;
};

/* Read last_holder, locked and switch_number. The wait programs run inside
 * gil->mutex's critical section, and every ns they take there costs the app
 * many (bench/README.md: one read, not three). bpf_probe_read_user cannot
 * fault a page in: a read can fail while the page is briefly unmapped (a
 * migration or compaction entry, reclaim). Then the wake-up is not used,
 * rather than taken for "the GIL is free" (counted: read_errors). */
static __always_inline int read_gil(struct target *t, struct gil_view *v)
{
    if (bpf_probe_read_user(v, sizeof(*v), (void *)(t->gil_addr + t->off_holder))) {
        __sync_fetch_and_add(&t->read_errors, 1);
        return -1;
    }
    return 0;
}

/* The thread id (in the target's PID namespace) of a PyThreadState, 0 if unknown. */
static __always_inline u32 tstate_tid(struct target *t, u64 tstate)
{
    u64 v = 0;
    if (!tstate || !t->tid_how || bpf_probe_read_user(&v, 8, (void *)(tstate + t->off_tid)))
        return 0;
    if (t->tid_how == GIL_TID_NATIVE)
        return (u32)v;
    /* 3.8 to 3.10 keep only pthread_self(): glibc's struct pthread, whose tid
     * field's offset comes from libc's own _thread_db_pthread_tid descriptor. */
    u32 tid = 0;
    if (!v || bpf_probe_read_user(&tid, 4, (void *)(v + t->off_pthread_tid)))
        return 0;
    return tid;
}

/* A timed wait that expired with the GIL still held and no switch since the
 * wait began makes take_gil set the drop request (SET_GIL_DROP_REQUEST,
 * ceval_gil.[ch]). Several waiters may ask during one hold: it counts once. */
static __always_inline void count_drop_request(struct target *t, struct thread_stats *th,
                                               u64 timed_out, u64 locked, u64 sw)
{
    if (timed_out && locked && sw == th->saved_switch && t->drop_switch != sw + 1) {
        t->drop_switch = sw + 1;
        t->forced_switches++;
    }
}

/* ------------------------------------------------ contended: who holds */

#ifndef PROBES_ALL
/* Add to a holder's entry in the holders map, made if new. Atomic: a
 * thread's exit (flush_slot) runs outside gil->mutex. */
static __always_inline void add_to_holder(struct target *t, u32 pid, u32 ns_tid,
                                          u64 held, u64 holds, u64 max)
{
    u64 key = (u64)pid << 32 | ns_tid;
    struct holder_stats *hs = holders.lookup(&key);
    if (!hs) {
        struct holder_stats init = {.pid = pid, .ns_tid = ns_tid};
        if (holders.insert(&key, &init))
            __sync_fetch_and_add(&t->untracked, 1);
        hs = holders.lookup(&key);
    }
    if (!hs)
        return;
    __sync_fetch_and_add(&hs->hold_ns, held);
    __sync_fetch_and_add(&hs->holds, holds);
    if (max > hs->max_hold_ns)
        hs->max_hold_ns = max;
}

/* Move a holder slot's totals to the holders map (struct holder_slot). Taken
 * with exchanges, so a slot is moved once when a waiter taking it and its
 * thread's exit race. A waiter that added to it as the exit freed it left a
 * remainder with no owner: counted (untracked), not guessed. */
static __always_inline void flush_slot(struct target *t, u32 pid, u64 ns_tid,
                                       struct holder_slot *s)
{
    u64 held = __sync_lock_test_and_set(&s->hold_ns, 0);
    u64 holds = __sync_lock_test_and_set(&s->holds, 0);
    u64 max = __sync_lock_test_and_set(&s->max_hold_ns, 0);
    if (!holds)
        return;
    if (!ns_tid)
        __sync_fetch_and_add(&t->untracked, 1);
    else
        add_to_holder(t, pid, (u32)ns_tid, held, holds, max);
}

/* The hold a waiter last saw ends at `end`: into the ring (the holders of
 * waits), the holder's totals, and an event if long. */
static __always_inline void close_seen_hold(struct target *t, u32 pid, u64 end)
{
    u32 holder = t->obs_holder;
    if (!holder)
        return;
    t->obs_holder = 0;
    struct gil_hold *h = &t->ring[t->releases & (GIL_HOLD_RING - 1)];
    h->tid = holder;
    h->flags = GIL_NS_TID | t->obs_flags;
    h->start_ns = t->obs_start;
    h->end_ns = end;
    __builtin_memcpy(&h->ctx, &t->obs_ctx, sizeof(h->ctx));
    /* The holder's own stack, if it took one in this hold (capture_stack):
     * the same thread and switch number. */
    h->stack_seq = t->stack_tid == holder && t->stack_switch == t->obs_switch ? t->stack_seq : 0;
    t->releases++;
    u64 held = end - t->obs_start;
    struct holder_slot *s = &t->held[holder & (GIL_HOLDER_SLOTS - 1)];
    if (s->ns_tid == holder) {
        s->hold_ns += held;
        s->holds++;
        if (held > s->max_hold_ns)
            s->max_hold_ns = held;
    } else {
        /* Its first hold goes to the map; it takes the slot from now on. */
        flush_slot(t, pid, s->ns_tid, s);
        s->ns_tid = holder;
        add_to_holder(t, pid, holder, held, 1, held);
    }
    if (held < HOLD_THRESHOLD_NS)
        return;
    struct gil_event *ev = events.ringbuf_reserve(sizeof(struct gil_event));
    if (!ev) {
        __sync_fetch_and_add(&t->lost, 1);
        return;
    }
    ev->kind = GIL_EVENT_HOLD;
    ev->pid = pid;
    ev->tid = holder;
    ev->nholds = 0;
    ev->start_ns = h->start_ns;
    ev->end_ns = end;
    ev->holds_total = 0;
    ev->probe_set = PROBE_SET;
    ev->flags = h->flags;
    ev->pad = 0;
    ev->stack_seq = h->stack_seq;
    ev->pad2 = 0;
    __builtin_memset(&ev->ctx, 0, sizeof(ev->ctx));
    read_ctx_of(t, holder, 1, &ev->ctx);
    u64 x, y;
    __builtin_memcpy(&x, h->ctx.span_id, sizeof(x));
    __builtin_memcpy(&y, ev->ctx.span_id, sizeof(y));
    ev->span_changed = x != y || h->ctx.valid != ev->ctx.valid;
    events.ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
}

static __always_inline void open_seen_hold(struct target *t, u32 holder, u64 start,
                                           u32 flags, u64 sw, int other)
{
    t->obs_holder = holder;
    t->obs_start = start;
    t->obs_flags = flags;
    t->obs_switch = sw;
    __builtin_memset(&t->obs_ctx, 0, sizeof(t->obs_ctx));
    read_ctx_of(t, holder, other, &t->obs_ctx);
}

/* A waiter's look (holding gil->mutex) replaces the hold last seen: closes it
 * at `now` and opens the next one, in one place so that the program has one
 * copy of each (they are inlined, with their context reads). */
struct seen {
    u32 holder;  /* 0: nothing changes */
    u32 flags;
    u64 switch_number;
    int own;     /* the holder is the looking thread: its slot is read once */
};

/* The GIL is locked by `holder` at switch number sw. A new holder or switch
 * number since the last look means the hold seen before ended; when unseen,
 * in between, counted as now (the release normally signals, so wakes, a
 * waiter: that look is close to it). */
static __always_inline void saw_locked(struct target *t, struct seen *next, u32 holder,
                                       u64 sw, int released)
{
    if (!holder)
        return;
    if (holder != t->obs_holder || sw != t->obs_switch) {
        next->holder = holder;
        next->flags = GIL_START_SEEN;
        next->switch_number = sw;
    } else if (released) {
        /* Woken by a release, yet the same thread holds again: it dropped and
         * re-took the GIL before this waiter got gil->mutex. */
        next->holder = holder;
        next->flags = 0;
        next->switch_number = sw;
    }
}

static __always_inline void apply_seen(struct target *t, u32 pid, u64 now, struct seen *next)
{
    if (next->holder) {
        close_seen_hold(t, pid, now);
        open_seen_hold(t, next->holder, now, next->flags, next->switch_number, !next->own);
    }
    t->obs_last = now;
}
#endif

static __always_inline void saw_switch(struct target *t, u64 sw)
{
    if (!t->switch_first)
        t->switch_first = sw + 1;
    t->switch_last = sw;
}

/* A timed wait on gil->cond begins (the caller holds gil->mutex). */
int on_wait(struct pt_regs *ctx)
{
    FLOOR_ONLY();
    u64 now = bpf_ktime_get_ns();
    u32 pid, tid;
    if (current_ids(&pid, &tid))
        return 0;
    struct target *t = targets.lookup(&pid);
    if (!t)
        return 0;
    /* pthread_cond_timedwait(&gil->cond, ...): a wait on the GIL we trace,
     * not on a sub-interpreter's own GIL (3.12+, PEP 684), whose state is
     * elsewhere and under another mutex. */
    if (PT_REGS_PARM1(ctx) != t->cond_addr)
        return 0;
    struct thread_stats *th = thread_of(tid, pid, t);
    if (!th)
        return 0;
    th->in_timed_wait = 1;
    struct gil_view g;
    if (read_gil(t, &g)) {
        th->saved_switch = ~0ULL; /* no drop request can be told from this wait */
        g.switch_number = t->switch_last;
        g.locked = 0;
    } else {
        saw_switch(t, g.switch_number);
        th->saved_switch = g.switch_number;
    }
    u64 sw = g.switch_number;
    th->timed_waits++;
    if (!th->wait_start) {
#ifdef PROBES_ALL
        if (th->hold_start) { /* a release we missed: drop the hold rather than invent one */
            th->hold_start = 0;
            th->unmatched++;
        }
        th->wait_seq = t->acq_seq;
#else
        th->wait_seq = sw;
        __sync_fetch_and_add(&t->waiting, 1);
#endif
        th->wait_start = now;
    }
#ifndef PROBES_ALL
    struct seen next = {};
    if (g.locked)
        saw_locked(t, &next, tstate_tid(t, g.last_holder), sw, 0);
    apply_seen(t, pid, now, &next);
#endif
    return 0;
}

/* The timed wait returned; the waiter holds gil->mutex. rax: its result. */
int on_wake(struct pt_regs *ctx)
{
    FLOOR_ONLY();
    u64 now = bpf_ktime_get_ns();
    u32 pid, tid;
    if (current_ids(&pid, &tid))
        return 0;
    struct target *t = targets.lookup(&pid);
    if (!t)
        return 0;
    struct thread_stats *th = threads.lookup(&tid);
    if (!th || !th->in_timed_wait)
        return 0; /* not a wait on our GIL (see on_wait) */
    th->in_timed_wait = 0;
    u64 timed_out = (u32)PT_REGS_RC(ctx) == ETIMEDOUT_;
    struct gil_view g;
    if (read_gil(t, &g))
        return 0; /* the next wake-up of this wait will tell */
    u64 locked = g.locked;
    u64 sw = g.switch_number;
    saw_switch(t, sw);
    t->wakeups++;
    count_drop_request(t, th, timed_out, locked, sw);
    /* GIL free, and we hold gil->mutex: take_gil's loop ends and this thread
     * takes the GIL next. Both sets end the wait here, so they time it the
     * same way; the all set times the few µs until take_gil is done apart
     * (take_ns, at on_held). */
#ifdef PROBES_ALL
    if (!locked) {
        end_wait(t, th, pid, tid, now, t->acq_seq);
        th->free_at = now;
    }
#else
    struct seen next = {};
    if (locked) {
        saw_locked(t, &next, tstate_tid(t, g.last_holder), sw, !timed_out);
    } else if (t->waiting <= 1) {
        /* The hold seen before ended with the release that woke us, and we,
         * the last waiter, take the GIL: nobody waits behind us, so our hold
         * is not followed (this set times holds only while another thread
         * waits; we may drop and re-take the GIL unseen meanwhile). The next
         * waiter's look opens it, as first seen then. */
        close_seen_hold(t, pid, now);
    } else {
        /* The hold seen before ended with the release that woke us; ours
         * begins (switch_number moves on if we were not the last holder). */
        u32 me = own_ns_tid(t, tid);
        next.holder = me;
        next.flags = 0;
        next.switch_number = sw + (tstate_tid(t, g.last_holder) != me);
        next.own = 1;
    }
    apply_seen(t, pid, now, &next); /* first: the wait's event lists that hold */
    if (!locked) {
        th->acquisitions++;
        end_wait(t, th, pid, tid, now, sw);
    }
#endif
    return 0;
}

/* ------------------------------------------------ all: every hand-off */

#ifdef PROBES_ALL
/* take_gil entry: where a build has no timed-wait call site, every wait
 * starts here (including the brief ones of an uncontended acquisition). */
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
    if (th->hold_start) {
        th->hold_start = 0;
        th->unmatched++;
    }
    th->wait_seq = t->acq_seq;
    th->wait_start = bpf_ktime_get_ns();
    return 0;
}

int on_held(struct pt_regs *ctx)
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
    end_wait(t, th, pid, tid, now, t->acq_seq); /* only with on_take_gil: else ended at wake */
    if (th->free_at) {
        th->take_ns += now - th->free_at;
        th->free_at = 0;
    }
    th->hold_start = now;
    th->stack_seq = 0;
    if (t->ctx_table) {
        __builtin_memset(&th->hold_ctx, 0, sizeof(th->hold_ctx));
        read_ctx(t, tid, &th->hold_ctx);
    }
    th->acquisitions++;
    /* As CPython counts switch_number: a hand-off is an acquisition by
     * another thread than the last holder (not the first one seen). */
    if (t->holder_tid && t->holder_tid != tid)
        t->handoffs++;
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
    ev->probe_set = PROBE_SET;
    ev->flags = 0;
    ev->pad = 0;
    ev->stack_seq = h->stack_seq;
    ev->pad2 = 0;
    __builtin_memcpy(&ev->ctx, at_release, sizeof(ev->ctx));
    ev->span_changed = span_changed(&h->ctx, at_release);
    events.ringbuf_submit(ev, BPF_RB_NO_WAKEUP);
}

int on_release(struct pt_regs *ctx)
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
        /* The GIL was held since before we attached, or (libc entry fallback)
         * glibc's own pthread_cond_signal from a waiter that gave up a
         * wake-up (__condvar_cancel_waiting, nptl/pthread_cond_wait.c). */
        if (th && !th->wait_start)
            th->unmatched++;
        return 0;
    }
    /* The ring keeps the context read when the hold began (on_held): one read
     * of the app's table per hand-off, not two. The context at release is
     * read only for the rare hold long enough to become an event. */
    struct gil_hold *h = &t->ring[t->releases & (GIL_HOLD_RING - 1)];
    h->tid = tid;
    h->flags = 0;
    h->start_ns = th->hold_start;
    h->end_ns = now;
    __builtin_memcpy(&h->ctx, &th->hold_ctx, sizeof(h->ctx));
    h->stack_seq = th->stack_seq;
    t->releases++;
    if (end_hold(th, now) >= HOLD_THRESHOLD_NS) {
        struct thread_ctx at_release = {};
        read_ctx(t, tid, &at_release);
        emit_hold(t, h, pid, &at_release);
    }
    return 0;
}
#endif

/* ------------------------------------------------ holder stacks */

#ifndef NO_STACKS

/* How long the calling thread, the GIL's holder, is known to have held it
 * (0: not known). all: from on_held. contended: since a waiter first saw the
 * hold (later than its start), so never more than the truth. */
static __always_inline u64 known_hold_ns(struct target *t, u32 tid, u32 me, u64 sw, u64 now)
{
#ifdef PROBES_ALL
    struct thread_stats *th = threads.lookup(&tid);
    return th && th->hold_start ? now - th->hold_start : 0;
#else
    return t->obs_holder == me && t->obs_switch == sw ? now - t->obs_start : 0;
#endif
}

/* The Python frames of the holder's thread state, innermost first. The
 * holder reads its own frames, stopped in the kernel: the chain is the one
 * it runs on (Python/ceval.c pushes and pops frames only in that thread).
 * Each pointer is the target's data: a failed read ends the walk, and the
 * walk ends after GIL_MAX_PYFRAMES. */
static __always_inline u32 read_pyframes(struct target *t, u64 tstate, struct gil_stack *s)
{
    u64 f = 0;
    if (t->off_frame == GIL_NO_OFFSET ||
        bpf_probe_read_user(&f, 8, (void *)(tstate + t->off_frame)))
        return 0;
    if (f && t->off_frame2 != GIL_NO_OFFSET &&
        bpf_probe_read_user(&f, 8, (void *)(f + t->off_frame2)))
        return 0;
    u32 n = 0;
#pragma clang loop unroll(disable) /* a bounded loop (Linux 5.3+): compiles in a fraction */
    for (int i = 0; i < GIL_MAX_PYFRAMES; i++) {
        if (!f)
            break;
        struct gil_pyframe *out = &s->frames[i];
        if (bpf_probe_read_user(&out->code, 8, (void *)(f + t->off_code)) ||
            bpf_probe_read_user(&out->instr, 8, (void *)(f + t->off_instr)) ||
            bpf_probe_read_user(&f, 8, (void *)(f + t->off_prev)))
            break;
        n = i + 1;
    }
    return n;
}

/* The user stack above sp, in chunks, as far as it is mapped (a thread's
 * stack may end less than GIL_STACK_CHUNKS KiB above sp). */
static __always_inline u32 copy_user_stack(struct gil_stack *s, u64 sp)
{
    u32 len = 0;
#pragma clang loop unroll(disable)
    for (int i = 0; i < GIL_STACK_CHUNKS; i++) {
        if (bpf_probe_read_user(&s->stack[i * GIL_STACK_CHUNK], GIL_STACK_CHUNK,
                                (void *)(sp + i * GIL_STACK_CHUNK)))
            break;
        len = (i + 1) * GIL_STACK_CHUNK;
    }
    return len;
}

#define GIL_SYNC_BYTES 176 /* 2 x (pthread_cond_t 48 + pthread_mutex_t 40) */

/* A stack taken as its holder blocked, until the holder runs again
 * (stack_blocks, keyed by the kernel's tid: sched_switch's next_pid). */
struct stack_block {
    u32 pid;              /* the target's key (current_ids) */
    u32 tid;              /* the thread's key in threads (current_ids) */
    u32 ns_tid;           /* the hold's owner, as struct target.stack_tid */
    u32 seq;
    u64 when_ns;
    u64 switch_number;
    u32 hold;             /* struct target.stack_hold */
    u32 pad;
};
BPF_TABLE("lru_hash", u32, struct stack_block, stack_blocks, MAX_THREADS);
/* How many stack_blocks entries may exist (at least as many as do: an
 * evicted or overwritten entry leaves it high). While it is 0, a context
 * switch does not look its next thread up there: an array lookup is inlined,
 * a hash lookup on every switch of the machine is not. */
BPF_ARRAY(open_blocks, u64, 1);

/* Which hold of the thread this is, beyond (tid, switch number): in the all
 * set, a thread that lets go and takes the GIL again with no other taker
 * keeps the switch number but starts a new hold. */
static __always_inline u32 hold_key(u32 tid)
{
#ifdef PROBES_ALL
    struct thread_stats *th = threads.lookup(&tid);
    return th ? (u32)th->hold_start : 0;
#else
    return 0;
#endif
}

/* A hold blocks several times (an allocation's brief wait before a long
 * sleep): stacks are taken at its first GIL_STACKS_PER_HOLD blocks, and the
 * hold names the one at the longest block (block_ended). */
#define GIL_STACKS_PER_HOLD 8

/* The stack that names the holder's current hold. */
static __always_inline void name_stack(struct target *t, u32 tid, u32 seq)
{
    t->stack_seq = seq;
#ifdef PROBES_ALL
    struct thread_stats *th = threads.lookup(&tid);
    if (th && th->hold_start)
        th->stack_seq = seq;
#endif
}

/* A thread that blocked holding the GIL runs again (sched_switch, next):
 * its block lasted from the stack's capture until now. */
static __always_inline void block_ended(u32 next)
{
    int zero = 0;
    u64 *open = open_blocks.lookup(&zero);
    if (!open || !*open)
        return;
    struct stack_block *b = stack_blocks.lookup(&next);
    if (!b)
        return;
    u64 len = bpf_ktime_get_ns() - b->when_ns;
    struct target *t = targets.lookup(&b->pid);
    if (t && t->stack_tid == b->ns_tid && t->stack_switch == b->switch_number &&
        t->stack_hold == b->hold && len > t->stack_block_ns) {
        t->stack_block_ns = len;
        name_stack(t, b->tid, b->seq);
    }
    if (stack_blocks.delete(&next) == 0 && *open)
        __sync_fetch_and_add(open, -1);
}

/* Take the stack of the calling thread if it holds the GIL of a target.
 * blocked: called from sched_switch as the thread blocks (any hold length:
 * how long it will block is not known yet, block_ended measures it); else
 * from a perf sample, only once the hold is known to have lasted
 * STACK_THRESHOLD_NS. Per hold (thread, switch number): one stack at a
 * sample, replaced by the first one taken at a block (the thread blocked
 * holding the GIL: that is what kept the others waiting); then stacks at up
 * to GIL_STACKS_PER_HOLD blocks, the longest block's naming the hold. */
static __always_inline void capture_stack(void *ctx, u32 blocked)
{
    u32 pid, tid;
    if (current_ids(&pid, &tid) || !maybe_target(pid))
        return;
    struct target *t = targets.lookup(&pid);
    if (!t || !t->stacks)
        return;
    if (blocked) {
        /* A waiter going to sleep on gil->cond does not hold the GIL: known
         * without the two reads below (most blocks of a contended app). */
        struct thread_stats *th = threads.lookup(&tid);
        if (th && th->in_timed_wait)
            return;
    }
    /* The holder's own read: no other thread changes these while it holds. */
    struct gil_view g;
    if (bpf_probe_read_user(&g, sizeof(g), (void *)(t->gil_addr + t->off_holder)) || !g.locked)
        return;
    u64 sw = g.switch_number, holder = g.last_holder;
    u32 me = own_ns_tid(t, tid);
    if (!me || tstate_tid(t, holder) != me)
        return;
    u64 now = bpf_ktime_get_ns();
    u32 hold = hold_key(tid);
    int same = t->stack_tid == me && t->stack_switch == sw && t->stack_hold == hold;
    if (same && (!blocked || t->stack_blocks >= GIL_STACKS_PER_HOLD))
        return;
    if (!blocked && known_hold_ns(t, tid, me, sw, now) < STACK_THRESHOLD_NS)
        return;
    /* The user registers, saved at kernel entry (syscall or interrupt). */
    struct pt_regs regs = {};
    struct pt_regs *uregs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    bpf_probe_read_kernel(&regs, sizeof(regs), uregs);
    /* Blocked on the GIL's own mutex (drop_gil locks gil->mutex before it
     * clears locked): the hold is ending, the stack says nothing. The futex
     * word is in the GIL struct's cond/mutex/switch_cond/switch_mutex, which
     * follow each other from cond (Include/internal/pycore_gil.h). */
    if (blocked && regs.orig_ax == 202 /* __NR_futex */ &&
        regs.di - t->cond_addr < GIL_SYNC_BYTES) {
        return;
    }
    struct gil_stack *s = events.ringbuf_reserve(sizeof(struct gil_stack));
    if (!s) {
        __sync_fetch_and_add(&t->stacks_lost, 1);
        return;
    }
    u32 seq = t->stack_next + 1;
    if (!seq)
        seq = 1;
    t->stack_next = seq;
    if (!same || !t->stack_blocked) {
        /* The hold's first stack, or its first at a block (over a sample's):
         * it names the hold until a longer block's. */
        t->stack_tid = me;
        t->stack_switch = sw;
        t->stack_hold = hold;
        t->stack_blocked = blocked;
        t->stack_blocks = 0;
        t->stack_block_ns = 0;
        name_stack(t, tid, seq);
    }
    t->stacks_taken++;
    if (blocked) {
        t->stack_blocks++;
        struct stack_block b = {.pid = pid, .tid = tid, .ns_tid = me, .seq = seq,
                                .when_ns = now, .switch_number = sw, .hold = hold};
        u32 ktid = (u32)bpf_get_current_pid_tgid();
        int zero = 0;
        u64 *open = open_blocks.lookup(&zero);
        if (open && stack_blocks.update(&ktid, &b) == 0)
            __sync_fetch_and_add(open, 1);
    }
    s->kind = GIL_EVENT_STACK;
    s->pid = pid;
    s->tid = tid;
    s->seq = seq;
    s->when_ns = now;
    s->switch_number = sw;
    s->blocked = blocked;
    s->user_stack_id = stacks.get_stackid(ctx, BPF_F_USER_STACK);
    s->ip = PT_REGS_IP(&regs);
    s->sp = PT_REGS_SP(&regs);
    s->bp = PT_REGS_FP(&regs);
    s->stack_len = copy_user_stack(s, s->sp);
    s->nframes = read_pyframes(t, holder, s);
    events.ringbuf_submit(s, BPF_RB_NO_WAKEUP);
}

/* A thread is switched out (it runs this: prev is current). Only a block
 * (a sleep or wait, not a preemption) takes a stack; on_sample covers
 * threads that keep the CPU. prev_state carries TASK_REPORT_MAX (0x100) on
 * preemption (kernel/sched: __trace_sched_switch_state). */
TRACEPOINT_PROBE(sched, sched_switch)
{
    FLOOR_ONLY();
    block_ended(args->next_pid);
    long state = args->prev_state;
    if ((state & 0x100) || !(state & 3)) /* TASK_INTERRUPTIBLE | TASK_UNINTERRUPTIBLE */
        return 0;
    capture_stack(args, 1);
    return 0;
}

/* A CPU-clock sample: the interrupted thread, if it holds a GIL long. */
int on_sample(struct pt_regs *ctx) /* a perf-event program: ctx only passed on */
{
    FLOOR_ONLY();
    capture_stack(ctx, 0);
    return 0;
}
#endif

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u32 pid, tid;
    if (current_ids(&pid, &tid) || !maybe_target(pid))
        return 0;
#ifndef PROBES_ALL
    /* A holder's slot goes to the map at its exit: the slot is free for the
     * next holder, and a later thread with its ns tid does not inherit it. */
    struct target *t = targets.lookup(&pid);
    if (t) {
        u64 me = own_ns_tid(t, tid);
        struct holder_slot *s = &t->held[me & (GIL_HOLDER_SLOTS - 1)];
        if (me && __sync_val_compare_and_swap(&s->ns_tid, me, 0) == me)
            flush_slot(t, pid, me, s);
    }
#endif
    struct thread_stats *th = threads.lookup(&tid);
    if (!th)
        return 0;
#ifdef PROBES_ALL
    /* A process exits holding the GIL (Py_Finalize never drops it): that
     * hold ends here. */
    if (th->hold_start)
        end_hold(th, bpf_ktime_get_ns());
#else
    if (th->wait_start && t && t->waiting)
        __sync_fetch_and_add(&t->waiting, -1);
#endif
    /* A thread can die inside take_gil (finalization, PyThread_exit_thread):
     * that wait never ends, so it is not counted. */
    th->exited = 1;
    th->wait_start = 0;
    th->in_timed_wait = 0;
    return 0;
}
