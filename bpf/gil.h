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

/* The app's context table (written by otel_gil/context.py): a header then
 * power-of-two many slots, slot i for native thread id t at index
 * (t + k) & (slots - 1), k < GIL_CTX_PROBES (open addressing). */
#define GIL_CTX_HEADER_SIZE 64
#define GIL_CTX_SLOT_SIZE 128
#define GIL_CTX_PROBES 4

enum gil_event_kind {
    GIL_EVENT_WAIT = 1, /* a wait at or above the wait threshold */
    GIL_EVENT_HOLD = 2, /* a hold at or above the hold threshold */
};

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
    __u32 reserved;
    __u64 start_ns;
    __u64 end_ns;
    struct thread_ctx ctx; /* the holder's context when it took the GIL */
    __u8 pad[4];
};

struct gil_event {
    __u32 kind;           /* enum gil_event_kind */
    __u32 pid;            /* host tgid */
    __u32 tid;            /* host tid of the waiter (wait) or holder (hold) */
    __u32 nholds;         /* entries used in holds[] (waits only) */
    __u64 start_ns;
    __u64 end_ns;
    __u64 holds_total;    /* acquisitions by others during the wait (may exceed nholds) */
    struct thread_ctx ctx; /* waiter's context (wait), holder's at release (hold) */
    __u8 span_changed;    /* holds: the thread's span at acquisition was another one */
    __u8 pad[3];
    struct gil_hold holds[GIL_MAX_HOLDERS];
};

/* Per-thread totals, kept in the kernel; user space reads them, and deletes a
 * thread's entry once it has read it after the thread exited. */
struct thread_stats {
    __u32 pid;
    __u32 exited;
    __u64 wait_start;     /* 0 when not waiting */
    __u64 hold_start;     /* 0 when not holding */
    __u64 wait_seq;       /* the process's acquisition count when the wait began */
    __u64 acquisitions;
    __u64 wait_ns;
    __u64 hold_ns;
    __u64 max_wait_ns;
    __u64 max_hold_ns;
    __u64 unmatched;      /* waits or holds whose start was not seen (attach, missed probe) */
    __u32 wait_hist[GIL_HIST_BUCKETS];
    __u32 hold_hist[GIL_HIST_BUCKETS];
    struct thread_ctx hold_ctx; /* the thread's context when its current hold began */
    __u8 pad[4];
};

/* Per traced process: configuration written by user space before the probes
 * are attached, then state kept by the probes. The probes update the state
 * only while their thread holds the GIL (at acquisition or release), so the
 * GIL itself serialises them. */
struct target {
    /* configuration */
    __u64 cond_addr;      /* runtime address of the GIL's condition variable */
    __u64 ctx_table;      /* runtime address of the app's context table, 0 = none */
    __u32 ctx_slots;      /* slots in that table, a power of two */
    __u32 ns_translate;   /* 1: the app lives in another PID namespace */
    __u64 ns_dev;         /* that namespace (stat of /proc/PID/ns/pid) */
    __u64 ns_ino;
    __u64 interval_ns;    /* switch interval: a hand-off after a wait this long was forced */
    /* state */
    __u32 holder_tid;
    __u32 reserved;
    __u64 acq_seq;        /* acquisitions so far; also the hold ring's write index */
    __u64 handoffs;       /* acquisitions by another thread than the last holder */
    __u64 forced_switches;
    __u64 lost;           /* events dropped: ring buffer full */
    __u64 untracked;      /* threads not tracked: thread map full */
    __u64 releases;       /* releases seen (condition signals on the GIL) */
    struct gil_hold ring[GIL_HOLD_RING];
};

#endif /* OTEL_GIL_H */
