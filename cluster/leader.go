package cluster

import (
	"context"
	"math/rand/v2"
	"strconv"
	"time"

	"go.uber.org/zap"
)

// Leader holds a feed's lease whenever it can, and runs the upstream reader
// while it holds it.
type Leader struct {
	// Store is the feed's store.
	Store Store
	// Holder identifies this instance; Run makes it unique per call.
	Holder string
	// TTL is how long the lease lasts unless renewed. Run tries to take it
	// and renews it every TTL/3, jittered.
	TTL time.Duration
	// Observer, if not nil, is told of lease changes and store errors.
	Observer Observer
	// Logger, if not nil, logs lease changes and store errors.
	Logger *zap.Logger
}

// Run takes the lease whenever it is free and, while it holds it, calls run
// with the meta the lease came with. run's context is cancelled as soon as
// the lease is lost, cannot be renewed before it expires, or ctx ends; run
// must then return. If run returns by itself, its term is over: Run takes
// the lease anew, at most once per TTL/3, and calls run with fresh meta.
// Run returns when ctx ends, after run has returned and the lease has been
// released.
func (l *Leader) Run(ctx context.Context, run func(ctx context.Context, m Meta)) {
	holder := l.Holder + ":" + strconv.FormatUint(rand.Uint64(), 36)
	f := faults{op: "acquire", observer: l.Observer, logger: l.logger()}
	for ctx.Err() == nil {
		m, held, err := l.Store.Acquire(ctx, holder, 0, l.TTL, NewEpoch())
		switch {
		case ctx.Err() != nil:
		case err != nil:
			f.failed(err)
		default:
			f.recovered()
		}
		wait := jitter(period(l.TTL))
		if held {
			start := time.Now()
			l.lead(ctx, holder, m, run)
			wait = time.Until(start.Add(period(l.TTL)))
		}
		sleep(ctx, wait)
	}
}

// lead runs run while holder holds the lease with m's term and returns once
// it has returned.
func (l *Leader) lead(ctx context.Context, holder string, m Meta, run func(context.Context, Meta)) {
	logger := l.logger().With(zap.String("epoch", m.Epoch), zap.Uint64("term", m.Term))
	logger.Info("lease taken")
	l.leaseChange(true)
	// The lease was set after this moment, so it lasts at least until
	// renewed+TTL. The clock is monotonic and runs on while the process is
	// stopped, so a stopped holder gives up its term as soon as it resumes.
	renewed := time.Now()
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		run(runCtx, m)
	}()
	end := func(release bool) {
		cancel()
		<-done
		if release {
			l.release(ctx, holder, m.Term)
		}
		l.leaseChange(false)
	}

	f := faults{op: "renew", observer: l.Observer, logger: logger}
	timer := time.NewTimer(jitter(period(l.TTL)))
	defer timer.Stop()
	for {
		select {
		case <-done:
		case <-ctx.Done():
		case <-timer.C:
		}
		switch {
		case ctx.Err() != nil:
			end(true)
			logger.Info("lease released")
			return
		case isClosed(done):
			end(false)
			logger.Info("lease term ended by the reader")
			return
		}
		expiry := renewed.Add(l.TTL)
		if !time.Now().Before(expiry) {
			end(false)
			logger.Warn("lease expired before it could be renewed")
			return
		}
		start := time.Now()
		renewCtx, cancelRenew := context.WithDeadline(ctx, expiry)
		_, held, err := l.Store.Acquire(renewCtx, holder, m.Term, l.TTL, "")
		cancelRenew()
		switch {
		case ctx.Err() != nil:
			// The next turn of the loop releases.
		case err == nil && held:
			f.recovered()
			renewed = start
			timer.Reset(jitter(period(l.TTL)))
		case err == nil:
			end(false)
			logger.Warn("lease lost")
			return
		default:
			f.failed(err)
			// Retry sooner, but not past the expiry, where the loop gives
			// up the term.
			timer.Reset(min(backoff(f.count), time.Until(expiry)))
		}
	}
}

// release gives up the lease, even though ctx has ended.
func (l *Leader) release(ctx context.Context, holder string, term uint64) {
	releaseCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), period(l.TTL))
	defer cancel()
	if err := l.Store.Release(releaseCtx, holder, term); err != nil {
		f := faults{op: "release", observer: l.Observer, logger: l.logger()}
		f.failed(err)
	}
}

func (l *Leader) leaseChange(held bool) {
	if l.Observer != nil {
		l.Observer.LeaseChange(held)
	}
}

func (l *Leader) logger() *zap.Logger {
	if l.Logger == nil {
		return zap.NewNop()
	}
	return l.Logger
}

// NewEpoch returns a random epoch name.
func NewEpoch() string {
	return strconv.FormatUint(rand.Uint64(), 36)
}

// period is how often a lease of ttl is renewed.
func period(ttl time.Duration) time.Duration { return ttl / 3 }

// jitter returns d give or take a fifth, so that instances drift apart.
func jitter(d time.Duration) time.Duration {
	return d*4/5 + rand.N(d*2/5+1)
}

// backoff returns how long to wait after the given number of consecutive
// failures: from 100ms, doubling, up to 5s, jittered.
func backoff(failures int) time.Duration {
	d := 100 * time.Millisecond << min(max(failures-1, 0), 6)
	return jitter(min(d, 5*time.Second))
}

// sleep waits for d or for ctx to end.
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// isClosed reports whether c is closed.
func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// faults counts consecutive failures of one store operation. It logs the
// first of a run at warn level, the others at debug level, and the
// recovery, so that an unreachable store does not flood the log; the
// observer counts every one.
type faults struct {
	op       string
	observer Observer
	logger   *zap.Logger
	count    int
}

func (f *faults) failed(err error) {
	f.count++
	if f.observer != nil {
		f.observer.StoreError(f.op)
	}
	level := zap.DebugLevel
	if f.count == 1 {
		level = zap.WarnLevel
	}
	f.logger.Log(level, "cluster store failed; retrying", zap.String("op", f.op), zap.Error(err))
}

func (f *faults) recovered() {
	if f.count > 0 {
		f.logger.Info("cluster store answers again", zap.String("op", f.op), zap.Int("failures", f.count))
	}
	f.count = 0
}
