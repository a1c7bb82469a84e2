package cluster_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/cluster"
	rediscluster "github.com/ssefeed/caddy-ssefeed/cluster/redis"
	"github.com/ssefeed/caddy-ssefeed/internal/clustertest"
	"github.com/ssefeed/caddy-ssefeed/replay"
)

// These tests run the loops over the Redis store and a real redis-server.

// backend returns a provisioned redis cluster module for address.
func backend(t testing.TB, address string) *rediscluster.Cluster {
	t.Helper()
	c := &rediscluster.Cluster{Address: address}
	require.NoError(t, c.Provision(caddy.Context{}))
	t.Cleanup(func() { require.NoError(t, c.Cleanup()) })
	return c
}

// open returns a store of the feed named "feed", closed when t ends.
func open(t testing.TB, c *rediscluster.Cluster) cluster.Store {
	t.Helper()
	s := c.Open("feed", replay.Limits{})
	t.Cleanup(func() { require.NoError(t, s.Close()) })
	return s
}

// noHints is a store whose hints are all lost.
type noHints struct{ cluster.Store }

func (noHints) Hints() <-chan struct{} { return nil }

// runMirror runs a Mirror of s into a recorder until t ends.
func runMirror(t testing.TB, s cluster.Store, obs cluster.Observer) (*cluster.Mirror, *clustertest.Recorder) {
	t.Helper()
	rec := &clustertest.Recorder{}
	m := &cluster.Mirror{Store: s, Log: rec, Reset: rec.Reset, Interval: 20 * time.Millisecond, Observer: obs}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		m.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return m, rec
}

// writer appends numbered entries as a lease holder would.
type writer struct {
	t     testing.TB
	store cluster.Store
	meta  cluster.Meta
	ids   []string // every id appended, in order
}

// take takes the lease, starting an epoch if the store has none.
func (w *writer) take() {
	w.t.Helper()
	var held bool
	require.Eventually(w.t, func() bool {
		var err error
		w.meta, held, err = w.store.Acquire(context.Background(), "writer", 0, time.Minute, cluster.NewEpoch())
		return err == nil
	}, 10*time.Second, 10*time.Millisecond)
	require.True(w.t, held)
}

// write appends n entries, one to three at a time, retrying each append
// until it succeeds. It returns ErrEpoch, with the epoch's entries
// written, if the store lost its data.
func (w *writer) write(n int) error {
	w.t.Helper()
	for i := 0; i < n; {
		var batch []cluster.Entry
		for range min(1+i%3, n-i) {
			w.meta.LastSeq++
			batch = append(batch, cluster.Entry{
				Seq:   w.meta.LastSeq,
				ID:    fmt.Sprintf("%s/%d", w.meta.Epoch, w.meta.LastSeq),
				Bytes: []byte("data"),
			})
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := w.store.Append(context.Background(), w.meta.Epoch, w.meta.Term, batch, nil)
			if err == nil {
				break
			}
			if errors.Is(err, cluster.ErrEpoch) || errors.Is(err, cluster.ErrFenced) || time.Now().After(deadline) {
				return err
			}
			time.Sleep(5 * time.Millisecond) // the Redis server's time, not ours
		}
		for _, e := range batch {
			w.ids = append(w.ids, e.ID)
		}
		i += len(batch)
	}
	return nil
}

// caughtUp waits until m has the writer's last entry.
func (w *writer) caughtUp(m *cluster.Mirror) {
	w.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	require.NoError(w.t, m.Wait(ctx, w.meta.Epoch, w.meta.LastSeq))
}

func TestMirrorWithoutHints(t *testing.T) {
	clustertest.CheckGoroutines(t)
	r := clustertest.StartRedis(t)
	c := backend(t, r.URL())
	w := &writer{t: t, store: open(t, c)}
	w.take()
	require.NoError(t, w.write(50))
	m, rec := runMirror(t, noHints{open(t, c)}, nil)
	require.NoError(t, w.write(250))
	w.caughtUp(m)
	require.Equal(t, w.ids, rec.Got(), "every entry once, in order")
}

func TestMirrorAcrossARedisStall(t *testing.T) {
	clustertest.CheckGoroutines(t)
	r := clustertest.StartRedis(t)
	// Short timeouts, so that a stalled Redis fails commands quickly.
	c := backend(t, r.URL()+"?read_timeout=200ms&write_timeout=200ms&max_retries=-1")
	w := &writer{t: t, store: open(t, c)}
	w.take()
	obs := &clustertest.Observer{}
	m, rec := runMirror(t, open(t, c), obs)
	require.NoError(t, w.write(100))

	r.Pause()
	done := make(chan error)
	go func() { done <- w.write(100) }()
	time.Sleep(time.Second) // Redis stalls for a second
	r.Resume()
	require.NoError(t, <-done)
	require.NoError(t, w.write(100))
	w.caughtUp(m)

	require.Equal(t, w.ids, rec.Got(), "every entry once, in order, across the stall and the retried appends")
	require.Positive(t, obs.Errors("read"), "errors were counted")
}

func TestMirrorAcrossARedisRestart(t *testing.T) {
	clustertest.CheckGoroutines(t)
	r := clustertest.StartRedis(t)
	c := backend(t, r.URL())
	w := &writer{t: t, store: open(t, c)}
	w.take()
	m, rec := runMirror(t, open(t, c), nil)
	require.NoError(t, w.write(50))
	w.caughtUp(m)
	before := slices.Clone(w.ids)

	r.Restart()
	require.ErrorIs(t, w.write(1), cluster.ErrEpoch)
	w.take()
	w.ids = nil
	require.NoError(t, w.write(50))
	w.caughtUp(m)

	require.Equal(t, slices.Concat(before, []string{"reset " + w.meta.Epoch}, w.ids), rec.Got(),
		"the old epoch, a reset, the new epoch")
}

// freezable is a store whose calls can be frozen as a stopped process's
// would: a call made while frozen goes out when thawed, whatever its
// context says meanwhile.
type freezable struct {
	cluster.Store
	mu     sync.Mutex
	thawed chan struct{} // nil unless frozen
}

func (f *freezable) freeze() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.thawed = make(chan struct{})
}

func (f *freezable) thaw() {
	f.mu.Lock()
	defer f.mu.Unlock()
	close(f.thawed)
	f.thawed = nil
}

func (f *freezable) wait() {
	f.mu.Lock()
	thawed := f.thawed
	f.mu.Unlock()
	if thawed != nil {
		<-thawed
	}
}

func (f *freezable) Acquire(ctx context.Context, holder string, term uint64, ttl time.Duration, newEpoch string) (cluster.Meta, bool, error) {
	f.wait()
	return f.Store.Acquire(context.WithoutCancel(ctx), holder, term, ttl, newEpoch)
}

func (f *freezable) Append(ctx context.Context, epoch string, term uint64, entries []cluster.Entry, state []byte) error {
	f.wait()
	return f.Store.Append(context.WithoutCancel(ctx), epoch, term, entries, state)
}

func TestLeaderFailoverFencesAStalledHolder(t *testing.T) {
	clustertest.CheckGoroutines(t)
	r := clustertest.StartRedis(t)
	c := backend(t, r.URL())
	const ttl = 300 * time.Millisecond

	type result struct {
		name    string
		term    uint64
		started time.Time
		err     error
	}
	results := make(chan result, 10)
	// run appends an entry every 5ms, as a feed's reader would, until its
	// context ends or an append is refused.
	run := func(name string, s cluster.Store) func(context.Context, cluster.Meta) {
		return func(ctx context.Context, m cluster.Meta) {
			started := time.Now()
			for seq := m.LastSeq + 1; ctx.Err() == nil; seq++ {
				e := cluster.Entry{Seq: seq, ID: fmt.Sprintf("%s/%d/%d", name, m.Term, seq)}
				if err := s.Append(ctx, m.Epoch, m.Term, []cluster.Entry{e}, nil); err != nil {
					results <- result{name, m.Term, started, err}
					return
				}
				time.Sleep(5 * time.Millisecond) // an upstream's pace
			}
			results <- result{name, m.Term, started, nil}
		}
	}
	leaders := map[string]*freezable{"a": {Store: open(t, c)}, "b": {Store: open(t, c)}}
	obs := map[string]*clustertest.Observer{"a": {}, "b": {}}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	for _, name := range []string{"a", "b"} {
		l := &cluster.Leader{Store: leaders[name], Holder: name, TTL: ttl, Observer: obs[name]}
		wg.Go(func() { l.Run(ctx, run(name, leaders[name])) })
		if name == "a" {
			time.Sleep(50 * time.Millisecond) // a takes the lease first
		}
	}

	time.Sleep(200 * time.Millisecond)
	frozen := time.Now()
	leaders["a"].freeze()
	var b result
	reader := open(t, c)
	require.Eventually(t, func() bool {
		_, entries, err := reader.Read(context.Background(), 0, 100000)
		require.NoError(t, err)
		last := entries[len(entries)-1].ID
		return last[0] == 'b'
	}, 5*time.Second, 10*time.Millisecond, "b takes over")
	tookOver := time.Since(frozen)
	leaders["a"].thaw()
	a := <-results
	require.Equal(t, "a", a.name)
	require.ErrorIs(t, a.err, cluster.ErrFenced, "a's append after its lease expired is refused")
	require.LessOrEqual(t, tookOver, ttl+ttl/3*6/5+100*time.Millisecond, "b took over within the lease and a renewal period")

	cancel()
	wg.Wait()
	b = <-results
	require.Equal(t, result{"b", 2, b.started, nil}, b)

	_, entries, err := reader.Read(context.Background(), 0, 100000)
	require.NoError(t, err)
	k := slices.IndexFunc(entries, func(e cluster.Entry) bool { return e.ID[0] == 'b' })
	require.Positive(t, k)
	for i, e := range entries {
		want := fmt.Sprintf("a/1/%d", i+1)
		if i >= k {
			want = fmt.Sprintf("b/2/%d", i+1)
		}
		require.Equal(t, want, e.ID, "a's entries, then b's, without gaps or repeats")
	}
	require.Equal(t, []bool{true, false}, obs["a"].Leases())
	require.Equal(t, []bool{true, false}, obs["b"].Leases())
}

func TestLeaderStartsANewEpochAfterRedisLostItsData(t *testing.T) {
	clustertest.CheckGoroutines(t)
	r := clustertest.StartRedis(t)
	s := open(t, backend(t, r.URL()))
	metas := make(chan cluster.Meta, 10)
	errs := make(chan error, 10)
	l := &cluster.Leader{Store: s, Holder: "h", TTL: time.Second}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		l.Run(ctx, func(ctx context.Context, m cluster.Meta) {
			metas <- m
			// Append until refused, as a reader whose feed's appends fail
			// ends its term.
			for seq := m.LastSeq + 1; ctx.Err() == nil; seq++ {
				if err := s.Append(ctx, m.Epoch, m.Term, []cluster.Entry{{Seq: seq, ID: fmt.Sprint(seq)}}, nil); errors.Is(err, cluster.ErrEpoch) {
					errs <- err
					return
				}
				time.Sleep(5 * time.Millisecond) // an upstream's pace
			}
		})
	}()
	defer func() {
		cancel()
		<-done
	}()

	first := <-metas
	require.Equal(t, uint64(1), first.Term)
	r.Restart()
	require.ErrorIs(t, <-errs, cluster.ErrEpoch)
	second := <-metas
	require.NotEqual(t, first.Epoch, second.Epoch)
	require.Equal(t, cluster.Meta{Epoch: second.Epoch, Term: 1}, second, "a new epoch, from scratch")
}
