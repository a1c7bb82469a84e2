package cluster

import (
	"context"
	"errors"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/ssefeed/caddy-ssefeed/internal/clustertest"
	"github.com/stretchr/testify/require"
)

// runs records the terms run is called with and whether one is running.
type runs struct {
	mu      sync.Mutex
	terms   []uint64
	running bool
	ended   []time.Time
}

// run holds the lease until ctx ends.
func (r *runs) run(ctx context.Context, m Meta) {
	r.mu.Lock()
	r.terms = append(r.terms, m.Term)
	r.running = true
	r.mu.Unlock()
	<-ctx.Done()
	r.mu.Lock()
	r.running = false
	r.ended = append(r.ended, time.Now())
	r.mu.Unlock()
}

func (r *runs) state() (terms []uint64, running bool, ended []time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]uint64(nil), r.terms...), r.running, append([]time.Time(nil), r.ended...)
}

// lead starts a Leader on store and returns the function that stops it
// and waits for it.
func lead(store Store, obs Observer, run func(context.Context, Meta)) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	l := &Leader{Store: store, Holder: "h", TTL: 3 * time.Second, Observer: obs}
	go func() {
		defer close(done)
		l.Run(ctx, run)
	}()
	return func() {
		cancel()
		<-done
	}
}

func TestLeaderRenewsWhileHeldAndReleasesAtTheEnd(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s, obs, r := newMemStore(), &clustertest.Observer{}, &runs{}
		stop := lead(s, obs, r.run)
		time.Sleep(30 * time.Second)
		synctest.Wait()
		terms, running, _ := r.state()
		require.Equal(t, []uint64{1}, terms, "one term, kept")
		require.True(t, running)
		// One take, then a renewal every second, give or take a fifth.
		require.InDelta(t, 31, s.count("acquire"), 6)

		stop()
		_, running, _ = r.state()
		require.False(t, running)
		require.Equal(t, 1, s.count("release"))
		require.Empty(t, s.holder, "released")
		require.Equal(t, []bool{true, false}, obs.Leases())
	})
}

func TestLeaderWaitsForAHeldLease(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s, r := newMemStore(), &runs{}
		_, held, err := s.Acquire(t.Context(), "other", 0, time.Hour, "e")
		require.NoError(t, err)
		require.True(t, held)
		stop := lead(s, nil, r.run)
		defer stop()
		time.Sleep(10 * time.Second)
		synctest.Wait()
		terms, _, _ := r.state()
		require.Empty(t, terms)
		// A try every second, give or take a fifth.
		require.InDelta(t, 10, s.count("acquire"), 3)

		s.set(func(s *memStore) { s.holder = "" }) // the other releases
		time.Sleep(2 * time.Second)
		synctest.Wait()
		terms, running, _ := r.state()
		require.Equal(t, []uint64{2}, terms)
		require.True(t, running)
	})
}

func TestLeaderStopsRunWhenTheLeaseIsLost(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s, obs, r := newMemStore(), &clustertest.Observer{}, &runs{}
		stop := lead(s, obs, r.run)
		defer stop()
		time.Sleep(time.Millisecond)
		_, running, _ := r.state()
		require.True(t, running)

		lost := time.Now()
		s.set(func(s *memStore) { s.holder, s.term = "other", s.term+1 })
		time.Sleep(2 * time.Second)
		synctest.Wait()
		_, running, ended := r.state()
		require.False(t, running)
		require.WithinDuration(t, lost, ended[0], 1200*time.Millisecond, "stopped at the next renewal")
		require.Equal(t, []bool{true, false}, obs.Leases())
		require.Zero(t, obs.Errors("renew"))
	})
}

func TestLeaderStopsRunWhenRenewalsFailUntilExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s, obs, r := newMemStore(), &clustertest.Observer{}, &runs{}
		stop := lead(s, obs, r.run)
		defer stop()
		time.Sleep(time.Millisecond)
		s.set(func(s *memStore) { s.fail = errors.New("redis down") })
		// The last renewal was at the take, a moment ago.
		expiry := time.Now().Add(3 * time.Second)
		time.Sleep(2900 * time.Millisecond)
		synctest.Wait()
		_, running, _ := r.state()
		require.True(t, running, "a failed renewal is retried while the lease lasts")
		require.GreaterOrEqual(t, obs.Errors("renew"), 2)

		time.Sleep(200 * time.Millisecond)
		synctest.Wait()
		_, running, ended := r.state()
		require.False(t, running)
		require.WithinDuration(t, expiry, ended[0], time.Millisecond, "stopped at the expiry")

		s.set(func(s *memStore) { s.fail = nil })
		time.Sleep(2 * time.Second)
		synctest.Wait()
		terms, running, _ := r.state()
		require.True(t, running, "taken again once the store answers")
		require.Equal(t, []uint64{1, 2}, terms, "the old lease had expired")
	})
}

func TestLeaderStopsRunWhenARenewalStallsPastExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s, r := newMemStore(), &runs{}
		stop := lead(s, nil, r.run)
		defer stop()
		time.Sleep(time.Millisecond)
		expiry := time.Now().Add(3 * time.Second)
		stall := make(chan struct{})
		s.set(func(s *memStore) { s.stall = stall })
		time.Sleep(4 * time.Second)
		synctest.Wait()
		_, running, ended := r.state()
		require.False(t, running)
		require.WithinDuration(t, expiry, ended[0], time.Millisecond,
			"a renewal never outlasts the lease")
		s.set(func(s *memStore) { s.stall = nil })
		close(stall)
	})
}

func TestLeaderTakesTheLeaseAgainWhenRunReturns(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newMemStore()
		var mu sync.Mutex
		var starts []time.Time
		stop := lead(s, nil, func(ctx context.Context, m Meta) {
			mu.Lock()
			defer mu.Unlock()
			starts = append(starts, time.Now())
			require.Equal(t, uint64(1), m.Term, "the same lease, kept")
		})
		time.Sleep(10*time.Second - time.Millisecond)
		stop()
		mu.Lock()
		defer mu.Unlock()
		require.Len(t, starts, 10, "once per renewal period")
		require.Zero(t, s.count("release"), "a run that returns keeps the lease")
	})
}

func TestLeadersTakeTurns(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newMemStore()
		var mu sync.Mutex
		holder := -1
		var terms []uint64
		run := func(i int) func(context.Context, Meta) {
			return func(ctx context.Context, m Meta) {
				mu.Lock()
				require.Equal(t, -1, holder, "one holder at a time")
				holder = i
				terms = append(terms, m.Term)
				mu.Unlock()
				<-ctx.Done()
				mu.Lock()
				holder = -1
				mu.Unlock()
			}
		}
		stops := []func(){lead(s, nil, run(0)), lead(s, nil, run(1)), lead(s, nil, run(2))}
		for range stops {
			time.Sleep(5 * time.Second)
			mu.Lock()
			i := holder
			mu.Unlock()
			require.NotEqual(t, -1, i, "someone took over within the renewal period")
			stops[i]()
		}
		mu.Lock()
		defer mu.Unlock()
		require.Equal(t, []uint64{1, 2, 3}, terms, "each leader took over once the previous one released")
	})
}
