/* pool.c — the persistent worker pool behind the nthreads argument of every kernel call.
 *
 * spfq_pool_run(nthreads, nchunks, fn, ctx) runs fn(ctx, c, n) once for every c in [0, n):
 * n = nchunks split dynamically over the calling thread and up to nthreads - 1 pool workers
 * (capped at SPFQ_POOL_MAX), or n = 1 (one call for the whole range, on the caller) when
 * nthreads <= 1, the pool is busy or no worker could be started. Results never depend on n.
 *
 * - Lazy: no thread exists until the first call with nthreads >= 2; workers are added when a
 *   call asks for more than exist, and are kept (a later call with fewer threads leaves the
 *   extra ones idle).
 * - Hand-off: the caller publishes the task (fn, ctx, then a claim word (generation << 32 |
 *   n << 16 | next chunk) and a ticket (generation << 8 | threads)); workers spin on the ticket (pause /
 *   yield) for SPFQ_SPIN_US microseconds (default 100; 0 = never spin) after their last task,
 *   then block on a condition variable. Back-to-back calls therefore cost a few cache-line
 *   transfers, not a thread creation (the previous version created and joined threads on every
 *   call: ~30-60 us and a fresh scheduling decision each time). Lost wake-ups are excluded by
 *   seq_cst ordering (ticket store / sleeper count load against sleeper count increment /
 *   ticket load, the latter under the mutex that the waker also takes).
 * - Chunks are claimed by compare-and-swap on the claim word, by the caller as well: the caller
 *   waits only for chunks a worker has actually claimed, never for a worker that has not been
 *   scheduled yet (on a 2-vCPU machine shared with another busy process a late worker would
 *   otherwise make a 2-thread call slower than a 1-thread one); a late worker finds the claim
 *   word's generation changed or its chunks gone and touches nothing.
 * - Two host threads at once: one task runs at a time (a mutex, taken with trylock); a caller
 *   that finds the pool busy does not wait for it but runs its whole range single-threaded
 *   (n = 1). So concurrent callers never block each other and never oversubscribe the cores;
 *   the price is that the second caller gets one thread. Calls from pool workers cannot happen
 *   (kernels do not call back).
 * - fork: a pthread_atfork handler (registered when the pool is created) takes the task mutex
 *   before fork (so no task is in flight), releases it in the parent, and in the child forgets
 *   the pool (its workers do not exist there; the old bookkeeping is leaked, never touched):
 *   the child's first multi-threaded call creates a fresh pool.
 * - Teardown: a library destructor (process exit or dlclose of the library) stops and joins
 *   the workers, unless a task is running at that moment (then they are left as they are).
 *   Workers block every signal, so they never run a host's signal handlers.
 * Plain C11 atomics and pthreads; no other dependency.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

typedef struct pool pool_t;

typedef struct {
    pool_t *p;
    int32_t idx;      /* slice index this worker runs (1 ..) */
    uint64_t ticket;  /* the ticket current when it was created */
} worker_arg;

struct pool {
    pthread_mutex_t lock;  /* only for blocking waits (wake / done) */
    pthread_cond_t wake, done_cv;
    _Atomic uint64_t ticket;   /* (generation << 8) | nt of the current task; nt = 0: stop */
    _Atomic uint64_t claim;    /* (generation << 32) | (chunks << 16) | next unclaimed chunk */
    _Atomic int32_t done;      /* chunks of the current task finished */
    _Atomic int32_t sleepers;  /* workers blocked on wake */
    _Atomic int32_t caller_asleep;
    spfq_pool_fn fn;           /* the current task, written before its ticket is published */
    void *ctx;
    int32_t nworkers;          /* workers 1 .. nworkers exist */
    pthread_t tid[SPFQ_POOL_MAX];
    worker_arg arg[SPFQ_POOL_MAX];
};

static pthread_mutex_t task_lock = PTHREAD_MUTEX_INITIALIZER; /* one task at a time; guards `pool` */
static pool_t *pool;
static long spin_ns;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long)t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Spin until *v != old (ticket wait) for up to spin_ns; returns the last value seen. */
static uint64_t spin_ticket(_Atomic uint64_t *v, uint64_t old) {
    uint64_t t = atomic_load_explicit(v, memory_order_acquire);
    if (t != old || spin_ns <= 0) return t;
    const long end = now_ns() + spin_ns;
    for (unsigned i = 1;; i++) {
        cpu_relax();
        t = atomic_load_explicit(v, memory_order_acquire);
        if (t != old || ((i & 63) == 0 && now_ns() > end)) return t;
    }
}

/* Claim chunks of generation gen and run them until none is left; returns how many ran. The
 * claim word alone decides (generation, chunk count, next chunk), so a failed claim (another
 * generation, or no chunk left) touches nothing else of the task. */
static int32_t run_chunks(pool_t *p, uint64_t gen) {
    int32_t ran = 0;
    uint64_t c = atomic_load(&p->claim);
    for (;;) {
        const int32_t n = (int32_t)((c >> 16) & 0xffffu), next = (int32_t)(c & 0xffffu);
        if ((c >> 32) != (gen & 0xffffffffu) || next >= n) return ran;
        if (!atomic_compare_exchange_weak(&p->claim, &c, c + 1)) continue; /* c reloaded */
        /* chunk claimed: the task cannot finish (nor be replaced) before it is done */
        p->fn(p->ctx, next, n);
        ran++;
        if (atomic_fetch_add(&p->done, 1) + 1 == n && atomic_load(&p->caller_asleep)) {
            pthread_mutex_lock(&p->lock);
            pthread_cond_signal(&p->done_cv);
            pthread_mutex_unlock(&p->lock);
        }
        c = atomic_load(&p->claim);
    }
}

static void *worker(void *arg) {
    const worker_arg *a = arg;
    pool_t *p = a->p;
    const int32_t me = a->idx;
    uint64_t seen = a->ticket;
    for (;;) {
        uint64_t t = spin_ticket(&p->ticket, seen);
        if (t == seen) { /* block until the next ticket */
            pthread_mutex_lock(&p->lock);
            atomic_fetch_add(&p->sleepers, 1);
            while ((t = atomic_load(&p->ticket)) == seen) pthread_cond_wait(&p->wake, &p->lock);
            atomic_fetch_sub(&p->sleepers, 1);
            pthread_mutex_unlock(&p->lock);
        }
        seen = t;
        const int32_t nt = (int32_t)(t & 0xff);
        if (nt == 0) break; /* stop */
        if (me < nt) run_chunks(p, t >> 8);
    }
    return NULL;
}

/* Publish ticket gen / nt and wake blocked workers. Caller holds task_lock. */
static void publish(pool_t *p, uint64_t gen, int32_t nt) {
    atomic_store(&p->ticket, (gen << 8) | (uint64_t)nt);
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->lock);
        pthread_cond_broadcast(&p->wake);
        pthread_mutex_unlock(&p->lock);
    }
}

static void fork_prepare(void) { pthread_mutex_lock(&task_lock); }
static void fork_parent(void) { pthread_mutex_unlock(&task_lock); }
static void fork_child(void) {
    pool = NULL; /* the workers stayed in the parent; the old struct is leaked, not touched */
    pthread_mutex_init(&task_lock, NULL);
}

static void init_once(void) {
    const char *e = getenv("SPFQ_SPIN_US");
    long us = 100;
    if (e && *e) {
        char *end;
        long v = strtol(e, &end, 10);
        if (*end == '\0' && v >= 0 && v <= 1000000) us = v;
    }
    spin_ns = us * 1000L;
    pthread_atfork(fork_prepare, fork_parent, fork_child);
}

static pool_t *pool_create(void) {
    pool_t *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    if (pthread_mutex_init(&p->lock, NULL)) { free(p); return NULL; }
    if (pthread_cond_init(&p->wake, NULL)) { pthread_mutex_destroy(&p->lock); free(p); return NULL; }
    if (pthread_cond_init(&p->done_cv, NULL)) {
        pthread_cond_destroy(&p->wake);
        pthread_mutex_destroy(&p->lock);
        free(p);
        return NULL;
    }
    atomic_init(&p->ticket, (uint64_t)1 << 8);
    return p;
}

/* Start worker nworkers + 1 (signals blocked in it). Caller holds task_lock, no task running. */
static int start_worker(pool_t *p) {
    const int32_t i = p->nworkers + 1;
    if (i >= SPFQ_POOL_MAX) return 0;
    p->arg[i] = (worker_arg){p, i, atomic_load(&p->ticket)};
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    const int rc = pthread_create(&p->tid[i], NULL, worker, &p->arg[i]);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) return 0;
    p->nworkers = i;
    return 1;
}

int32_t spfq_pool_run(int32_t nthreads, int32_t nchunks, spfq_pool_fn fn, void *ctx) {
    if (nthreads > SPFQ_POOL_MAX) nthreads = SPFQ_POOL_MAX;
    if (nthreads <= 1 || nchunks <= 1 || pthread_mutex_trylock(&task_lock) != 0) {
        fn(ctx, 0, 1);
        return 1;
    }
    pthread_once(&once, init_once);
    if (!pool) pool = pool_create();
    pool_t *p = pool;
    while (p && p->nworkers < nthreads - 1 && start_worker(p)) {}
    const int32_t nt = !p ? 1 : nthreads < p->nworkers + 1 ? nthreads : p->nworkers + 1;
    if (nt <= 1) {
        pthread_mutex_unlock(&task_lock);
        fn(ctx, 0, 1);
        return 1;
    }
    const uint64_t gen = (atomic_load_explicit(&p->ticket, memory_order_relaxed) >> 8) + 1;
    if (nchunks > 0xffff) nchunks = 0xffff;
    p->fn = fn;
    p->ctx = ctx;
    atomic_store(&p->done, 0);
    atomic_store(&p->claim, ((gen & 0xffffffffu) << 32) | ((uint64_t)nchunks << 16));
    publish(p, gen, nt);
    run_chunks(p, gen);
    /* wait for the chunks workers claimed: spin, then block */
    if (spin_ns > 0 && atomic_load_explicit(&p->done, memory_order_acquire) != nchunks) {
        const long end = now_ns() + spin_ns;
        for (unsigned i = 1; atomic_load_explicit(&p->done, memory_order_acquire) != nchunks; i++) {
            cpu_relax();
            if ((i & 63) == 0 && now_ns() > end) break;
        }
    }
    if (atomic_load(&p->done) != nchunks) {
        pthread_mutex_lock(&p->lock);
        atomic_store(&p->caller_asleep, 1);
        while (atomic_load(&p->done) != nchunks) pthread_cond_wait(&p->done_cv, &p->lock);
        atomic_store(&p->caller_asleep, 0);
        pthread_mutex_unlock(&p->lock);
    }
    pthread_mutex_unlock(&task_lock);
    return nchunks;
}

int32_t spfq_pool_workers(void) {
    if (pthread_mutex_trylock(&task_lock) != 0) return -1;
    const int32_t n = pool ? pool->nworkers : 0;
    pthread_mutex_unlock(&task_lock);
    return n;
}

/* Stop and join the workers (library unload / process exit); skipped while a task runs. */
__attribute__((destructor)) static void pool_teardown(void) {
    if (pthread_mutex_trylock(&task_lock) != 0) return;
    pool_t *p = pool;
    if (p) {
        publish(p, (atomic_load(&p->ticket) >> 8) + 1, 0);
        for (int32_t i = 1; i <= p->nworkers; i++) pthread_join(p->tid[i], NULL);
        pthread_cond_destroy(&p->wake);
        pthread_cond_destroy(&p->done_cv);
        pthread_mutex_destroy(&p->lock);
        free(p);
        pool = NULL;
    }
    pthread_mutex_unlock(&task_lock);
}

static long min_work = -1;
static pthread_once_t min_work_once = PTHREAD_ONCE_INIT;
static void min_work_init(void) {
    const char *e = getenv("SPFQ_PARALLEL_MIN_WORK");
    char *end = NULL;
    const long v = e && *e ? strtol(e, &end, 10) : -1;
    min_work = (e && *e && end && !*end && v >= 0) ? v : (1L << 20);
}

int32_t spfq_threads_for(int64_t work, int32_t nthreads) {
    pthread_once(&min_work_once, min_work_init);
    return work < min_work ? 1 : nthreads;
}

typedef struct { void *p[SPFQ_SCR_SLOTS]; size_t cap[SPFQ_SCR_SLOTS]; } scratch_set;
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static void scratch_free(void *v) {
    scratch_set *b = v;
    for (int i = 0; i < SPFQ_SCR_SLOTS; i++) free(b->p[i]);
    free(b);
}
static void scratch_init(void) { pthread_key_create(&scratch_key, scratch_free); }

void *spfq_scratch(int slot, size_t bytes, int zeroed) {
    pthread_once(&scratch_once, scratch_init);
    scratch_set *b = pthread_getspecific(scratch_key);
    if (!b) {
        if (!(b = calloc(1, sizeof *b))) return NULL;
        if (pthread_setspecific(scratch_key, b)) {
            free(b);
            return NULL;
        }
    }
    if (b->cap[slot] < bytes || !b->p[slot]) {
        free(b->p[slot]);
        const size_t size = (bytes + 64) / 64 * 64;
        b->p[slot] = aligned_alloc(64, size);
        b->cap[slot] = b->p[slot] ? bytes : 0;
        if (b->p[slot] && zeroed) memset(b->p[slot], 0, size);
    }
    return b->p[slot];
}
