/* Shared between the BPF program (gil.bpf.c) and user space (otel_gil/events.py
 * mirrors these structs with ctypes; tests/test_events.py compiles this header
 * with gcc and checks every size and offset).
 *
 * Units: nanoseconds of CLOCK_MONOTONIC (bpf_ktime_get_ns). Thread and process
 * ids are host ids unless a field says otherwise.
 */
#ifndef OTEL_GIL_H
#define OTEL_GIL_H

#include <linux/types.h>

/* Wait/hold histograms: bucket 0 holds values below 2^GIL_HIST_MIN_SHIFT ns;
 * above that, each power of two is split into 4 sub-buckets (so a percentile
 * read from the histogram is within 25% of the truth). Mirrored by
 * otel_gil.timeline.bucket_of(). */
#define GIL_HIST_MIN_SHIFT 6
#define GIL_HIST_BUCKETS 128

/* A wait event carries the holds that overlapped it, newest first. */
#define GIL_MAX_HOLDERS 16
/* Holds remembered per process for that (a power of two). */
#define GIL_HOLD_RING 16
/* Contended set: holders whose totals a process keeps in place (struct
 * target.held, a power of two), off a hash-map update under gil->mutex. */
#define GIL_HOLDER_SLOTS 16
/* Words of the target-pid bitmap (target_pids): PID_MAX_LIMIT, 4M pids. */
#define GIL_PID_WORDS 65536

/* The app's context table (written by otel_gil/context.py): a header then
 * power-of-two many slots, slot i for native thread id t at index
 * (t + k) & (slots - 1), k < GIL_CTX_PROBES (open addressing). */
#define GIL_CTX_HEADER_SIZE 64
#define GIL_CTX_SLOT_SIZE 128
#define GIL_CTX_PROBES 4

enum gil_event_kind {
    GIL_EVENT_WAIT = 1, /* a wait at or above the wait threshold */
    GIL_EVENT_HOLD = 2, /* a hold at or above the hold threshold */
    GIL_EVENT_STACK = 3, /* a holder's stack, taken in its own context (struct gil_stack) */
};

/* Holder stacks (otel_gil/stacks.py decodes them): Python frames read from
 * the holder's thread state, and the top of its user stack, copied for the
 * sidecar's unwinder (no frame pointers needed), beside the kernel's own
 * frame-pointer walk (a BPF_STACK_TRACE id). */
#define GIL_MAX_PYFRAMES 32
#define GIL_STACK_CHUNK 1024
#define GIL_STACK_CHUNKS 12   /* 12 KiB of stack from the user sp */
#define GIL_NO_OFFSET 0xffffffffu

/* Probe sets: what a program was compiled for (-DPROBES_ALL or not). */
enum gil_probe_set {
    GIL_SET_CONTENDED = 1, /* only the timed wait in take_gil: nothing on an uncontended hand-off */
    GIL_SET_ALL = 2,       /* every acquisition and release as well */
};

/* gil_hold.flags and gil_event.flags */
#define GIL_NS_TID 1     /* tid is in the target's PID namespace (read from its tstate) */
#define GIL_START_SEEN 2 /* start is when a waiter first saw this hold: it began earlier */

/* How the holder's thread id is read from its PyThreadState (target.tid_how) */
#define GIL_TID_NATIVE 1  /* u64 tstate->native_thread_id (3.11+) */
#define GIL_TID_PTHREAD 2 /* tstate->thread_id is a pthread_t; glibc keeps the tid in it */

/* OTEP 4947 thread-context record header: 28 bytes, host-endian, packed. */
struct thread_ctx {
    __u8 trace_id[16];
    __u8 span_id[8];
    __u8 valid;
    __u8 trace_flags;
    __u16 attrs_data_size;
} __attribute__((packed));

/* The head of one context-table slot: what the probes read. */
struct ctx_slot_head {
    __u32 tid;            /* native thread id in the app's PID namespace; 0 = free */
    __u32 reserved;
    __u64 ident;          /* Python thread ident (threading.get_ident()) */
    struct thread_ctx ctx;
} __attribute__((packed));

/* One hold, as remembered for blame. */
struct gil_hold {
    __u32 tid;
    __u32 flags;          /* GIL_NS_TID, GIL_START_SEEN */
    __u64 start_ns;
    __u64 end_ns;
    struct thread_ctx ctx; /* the holder's context when it took the GIL */
    __u32 stack_seq;      /* the holder's stack (struct gil_stack.seq), 0 = none taken */
};

struct gil_event {
    __u32 kind;           /* enum gil_event_kind */
    __u32 pid;            /* host tgid */
    __u32 tid;            /* host tid of the waiter (wait) or holder (hold) */
    __u32 nholds;         /* entries used in holds[] (waits only) */
    __u64 start_ns;
    __u64 end_ns;
    __u64 holds_total;    /* all: acquisitions by others during the wait; contended:
                           * hand-offs (switch_number) during it. May exceed nholds. */
    struct thread_ctx ctx; /* waiter's context (wait), holder's at release (hold) */
    __u8 span_changed;    /* holds: the thread's span at acquisition was another one */
    __u8 probe_set;       /* enum gil_probe_set */
    __u8 flags;           /* GIL_NS_TID, GIL_START_SEEN */
    __u8 pad;
    __u32 stack_seq;      /* holds: the holder's stack (struct gil_stack.seq), 0 = none */
    __u32 pad2;
    struct gil_hold holds[GIL_MAX_HOLDERS];
};

/* Per-thread totals, kept in the kernel; user space reads them, and deletes a
 * thread's entry once it has read it after the thread exited.
 *
 * A wait is a take_gil call that had to wait on gil->cond: it begins at its
 * first timed wait and ends when a wake-up finds the GIL free (the thread
 * holds gil->mutex then, and takes the GIL next). An acquisition that
 * found the GIL free is not a wait (and, with the contended set, not seen).
 * Both sets count waits the same way: wait_ns, max_wait_ns, wait_hist, waits.
 * Only the all set sees holds: hold_ns, max_hold_ns, hold_hist, take_ns stay
 * 0 with the contended set (its holders: struct holder_stats), whose
 * acquisitions are only those that ended a wait. */
struct thread_stats {
    __u32 pid;
    __u16 exited;
    __u16 in_timed_wait;  /* between a timed wait on our GIL's cond and its return */
    __u64 wait_start;     /* 0 when not waiting */
    __u64 hold_start;     /* 0 when not holding (all set) */
    __u64 wait_seq;       /* all: the process's acquisitions, contended: its switch_number,
                           * when the wait began */
    __u64 acquisitions;   /* all: every acquisition; contended: those that ended a wait */
    __u64 wait_ns;
    __u64 hold_ns;
    __u64 max_wait_ns;
    __u64 max_hold_ns;
    __u64 unmatched;      /* waits or holds whose start was not seen (attach, missed probe) */
    __u64 waits;          /* waits ended (the count of wait_hist) */
    __u64 timed_waits;    /* timed waits on gil->cond begun (several per long wait) */
    __u64 saved_switch;   /* switch_number before the current timed wait (drop requests) */
    __u64 free_at;        /* all: when this waiter found the GIL free (0: not pending) */
    __u64 take_ns;        /* all: from finding the GIL free to holding it, summed */
    __u32 wait_hist[GIL_HIST_BUCKETS];
    __u32 hold_hist[GIL_HIST_BUCKETS];
    struct thread_ctx hold_ctx; /* the thread's context when its current hold began */
    __u32 stack_seq;      /* all: the stack taken during its current hold, 0 = none */
};

/* Contended set: how long a thread held the GIL while another waited, as
 * reconstructed from the waiters' wake-ups. Keyed by pid << 32 | tid, the tid
 * in the target's PID namespace (read from the holder's PyThreadState). */
struct holder_stats {
    __u32 pid;
    __u32 ns_tid;
    __u64 hold_ns;
    __u64 holds;
    __u64 max_hold_ns;
};

/* The same totals kept in the target, direct-mapped by ns tid: a waiter's
 * look adds a hold there when the holder owns its slot (struct target.held).
 * The first hold of a holder that does not goes to the holders map, and the
 * holder takes the slot; what the slot held is added to the map first. A
 * thread's exit adds its slot to the map and frees it. So a holder's totals
 * are its map entry plus its slot (probes/totals.py holder_totals). */
struct holder_slot {
    __u64 ns_tid;         /* 0: free (64 bits: BPF's cmpxchg) */
    __u64 hold_ns;
    __u64 holds;
    __u64 max_hold_ns;
};

/* Per traced process: configuration written by user space before the probes
 * are attached, then state kept by the probes. The all set's acquisition and
 * release probes update their part while their thread holds the GIL; the wait
 * and wake probes update theirs while their thread holds gil->mutex. Either
 * lock serialises the writers of each part. */
struct target {
    /* configuration */
    __u64 cond_addr;      /* runtime address of the GIL's condition variable */
    __u64 ctx_table;      /* runtime address of the app's context table, 0 = none */
    __u32 ctx_slots;      /* slots in that table, a power of two */
    __u32 ns_translate;   /* 1: the app lives in another PID namespace */
    __u64 ns_dev;         /* that namespace (stat of /proc/PID/ns/pid) */
    __u64 ns_ino;
    __u64 interval_ns;    /* switch interval (the timed wait's length) */
    __u64 gil_addr;       /* runtime address of the GIL struct */
    __u32 off_locked;     /* offsets in it (otel_gil/layout.py) */
    __u32 off_holder;     /* last_holder: a PyThreadState* */
    __u32 off_switch;     /* switch_number */
    __u32 tid_how;        /* GIL_TID_*, 0: holders' tids unknown */
    __u32 off_tid;        /* in PyThreadState: native_thread_id or thread_id */
    __u32 off_pthread_tid; /* GIL_TID_PTHREAD: glibc's tid in struct pthread */
    /* state of the acquisition and release probes (all set) */
    __u32 holder_tid;
    __u32 waiting;        /* contended: threads in a wait (wait_start set) */
    __u64 acq_seq;        /* acquisitions so far */
    __u64 handoffs;       /* acquisitions by another thread than the last holder */
    __u64 forced_switches; /* holds asked to drop (wake probes, both sets) */
    __u64 lost;           /* events dropped: ring buffer full */
    __u64 untracked;      /* threads not tracked (thread or holder map full), and holds
                           * whose slot its thread's exit emptied meanwhile */
    __u64 releases;       /* holds written to the ring: all set, releases seen */
    struct gil_hold ring[GIL_HOLD_RING];
    /* state of the wait and wake probes */
    __u64 drop_switch;    /* switch_number + 1 of the last hold asked to drop */
    __u64 obs_switch;     /* contended: the current hold as last seen by a waiter */
    __u32 obs_holder;     /* its holder (ns tid), 0 = none seen */
    __u32 obs_flags;      /* GIL_START_SEEN */
    __u64 obs_start;
    __u64 obs_last;       /* when a waiter last looked */
    struct thread_ctx obs_ctx; /* the holder's context when first seen */
    __u32 torn_reads;     /* another thread's context slot changed while read: not used */
    __u32 read_errors;    /* reads of the GIL struct that failed: that wake-up not used */
    __u64 wakeups;        /* timed waits that returned */
    __u64 switch_first;   /* switch_number + 1 at the first wait or wake seen, 0 = none */
    __u64 switch_last;    /* switch_number at the last one */
    /* holder stacks: configuration (off_frame GIL_NO_OFFSET: no Python frames) */
    __u32 stacks;         /* 1: take holder stacks in this target */
    __u32 off_frame;      /* in PyThreadState: frame (3.8-3.10), cframe (3.11, 3.12), current_frame */
    __u32 off_frame2;     /* then in that: current_frame (_PyCFrame, 3.11, 3.12), else GIL_NO_OFFSET */
    __u32 off_prev;       /* in a frame: f_back / previous */
    __u32 off_code;       /* f_code / f_executable */
    __u32 off_instr;      /* f_lasti (an int, 3.8-3.10) / prev_instr / instr_ptr */
    /* holder stacks: state, written by the holder itself while it holds the GIL */
    __u32 stack_tid;      /* ns tid of the hold the stacks are of */
    __u32 stack_seq;      /* the seq of the stack that names this hold (1, 2, ...) */
    __u32 stack_blocked;  /* it was taken as the holder blocked (sched_switch) */
    __u32 stack_blocks;   /* stacks taken at blocks in this hold (GIL_STACKS_PER_HOLD at most) */
    __u64 stack_switch;   /* switch_number of the hold it was taken in */
    __u64 stacks_taken;
    __u64 stacks_lost;    /* stacks not sent: ring buffer full */
    __u64 stack_block_ns; /* how long the holder stayed blocked at stack_seq's block (0: not known) */
    __u32 stack_next;     /* the last seq given to a stack */
    __u32 stack_hold;     /* all: low 32 bits of the hold's start (a thread's new
                             acquisition at the same switch number is a new hold) */
    /* contended: holder totals kept in place (struct holder_slot) */
    struct holder_slot held[GIL_HOLDER_SLOTS];
};

struct gil_pyframe {
    __u64 code;           /* f_code / f_executable (3.14+: a tagged _PyStackRef) */
    __u64 instr;          /* f_lasti (low 32 bits) / prev_instr / instr_ptr */
};

/* One holder stack, taken in the holder's own context while it held the GIL. */
struct gil_stack {
    __u32 kind;           /* GIL_EVENT_STACK */
    __u32 pid;            /* host tgid */
    __u32 tid;            /* host tid of the holder */
    __u32 seq;            /* per target, from 1: what gil_hold.stack_seq names */
    __u64 when_ns;
    __u64 switch_number;  /* of the hold */
    __s32 user_stack_id;  /* BPF_STACK_TRACE id of the kernel's frame-pointer walk, <0: none */
    __u32 blocked;        /* 1: at sched_switch, blocking; 0: at a perf sample */
    __u32 nframes;        /* Python frames read, innermost first */
    __u32 stack_len;      /* bytes of stack[] copied from sp */
    __u64 ip, sp, bp;     /* the user registers (task_pt_regs) */
    struct gil_pyframe frames[GIL_MAX_PYFRAMES];
    __u8 stack[GIL_STACK_CHUNK * GIL_STACK_CHUNKS];
};

#endif /* OTEL_GIL_H */
