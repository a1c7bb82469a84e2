package rediscluster

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/cluster"
	"github.com/ssefeed/caddy-ssefeed/internal/clustertest"
	"github.com/ssefeed/caddy-ssefeed/replay"
)

// provision returns a cluster module for address, cleaned up when t ends.
func provision(t *testing.T, address string) *Cluster {
	t.Helper()
	c := &Cluster{Address: address}
	require.NoError(t, c.Provision(caddy.Context{}))
	require.NoError(t, c.Validate())
	t.Cleanup(func() { require.NoError(t, c.Cleanup()) })
	return c
}

// open returns the store of feed, closed when t ends.
func open(t *testing.T, c *Cluster, feed string, limits replay.Limits) cluster.Store {
	t.Helper()
	s := c.Open(feed, limits)
	t.Cleanup(func() { require.NoError(t, s.Close()) })
	return s
}

// leased returns a fresh Redis and the store of a feed on it, with limits,
// whose lease instance "a" holds for a minute in epoch "e1".
func leased(t *testing.T, limits replay.Limits) (*clustertest.Redis, cluster.Store, cluster.Meta) {
	t.Helper()
	r := clustertest.StartRedis(t)
	s := open(t, provision(t, r.URL()), "feed", limits)
	m, held, err := s.Acquire(context.Background(), "a", 0, time.Minute, "e1")
	require.NoError(t, err)
	require.True(t, held)
	return r, s, m
}

// rawClient returns a plain client of the server, for what the cluster
// never does, such as flushing.
func rawClient(t *testing.T, r *clustertest.Redis) *redis.Client {
	t.Helper()
	options, err := redis.ParseURL(r.URL())
	require.NoError(t, err)
	rdb := redis.NewClient(options)
	t.Cleanup(func() { rdb.Close() })
	return rdb
}

// entries returns entries numbered from first to last, with ids e<seq>,
// keys k<seq> and bytes data<seq>.
func entries(first, last uint64) []cluster.Entry {
	var es []cluster.Entry
	for seq := first; seq <= last; seq++ {
		n := strconv.FormatUint(seq, 10)
		es = append(es, cluster.Entry{Seq: seq, ID: "e" + n, Key: "k" + n, Bytes: []byte("data" + n)})
	}
	return es
}

// readAll returns the meta and every entry after 0.
func readAll(t *testing.T, s cluster.Store) (cluster.Meta, []cluster.Entry) {
	t.Helper()
	m, es, err := s.Read(context.Background(), 0, 10000)
	require.NoError(t, err)
	return m, es
}

// seqs returns the entries' Seqs.
func seqs(es []cluster.Entry) []uint64 {
	out := []uint64{}
	for _, e := range es {
		out = append(out, e.Seq)
	}
	return out
}

func TestAcquireRenewRelease(t *testing.T) {
	clustertest.CheckGoroutines(t)
	r := clustertest.StartRedis(t)
	s := open(t, provision(t, r.URL()), "feed", replay.Limits{})
	ctx := context.Background()
	const ttl = time.Minute

	m, held, err := s.Acquire(ctx, "a", 0, ttl, "e1")
	require.NoError(t, err)
	require.True(t, held)
	require.Equal(t, cluster.Meta{Epoch: "e1", Term: 1}, m, "the first take starts the epoch with term 1")

	m, held, err = s.Acquire(ctx, "a", 0, ttl, "e2")
	require.NoError(t, err)
	require.True(t, held, "the holder keeps its lease")
	require.Equal(t, cluster.Meta{Epoch: "e1", Term: 1}, m, "keeping is not taking: same epoch and term")

	_, held, err = s.Acquire(ctx, "a", 1, ttl, "")
	require.NoError(t, err)
	require.True(t, held, "renewal with the current term")
	_, held, err = s.Acquire(ctx, "a", 7, ttl, "")
	require.NoError(t, err)
	require.False(t, held, "renewal with another term")

	m, held, err = s.Acquire(ctx, "b", 0, ttl, "e3")
	require.NoError(t, err)
	require.False(t, held, "another holder cannot take a held lease")
	require.Equal(t, uint64(1), m.Term)

	require.NoError(t, s.Release(ctx, "b", 1), "releasing a lease held by another does nothing")
	_, held, err = s.Acquire(ctx, "b", 0, ttl, "e3")
	require.NoError(t, err)
	require.False(t, held)

	require.NoError(t, s.Release(ctx, "a", 1))
	_, held, err = s.Acquire(ctx, "a", 1, ttl, "")
	require.NoError(t, err)
	require.False(t, held, "a released lease cannot be renewed")

	m, held, err = s.Acquire(ctx, "b", 0, ttl, "e3")
	require.NoError(t, err)
	require.True(t, held)
	require.Equal(t, cluster.Meta{Epoch: "e1", Term: 2}, m, "a take increments the term")
}

func TestAcquireCompetition(t *testing.T) {
	clustertest.CheckGoroutines(t)
	r := clustertest.StartRedis(t)
	c := provision(t, r.URL())
	const holders = 20
	stores := make([]cluster.Store, holders)
	for i := range stores {
		stores[i] = open(t, c, "feed", replay.Limits{})
	}

	var wg sync.WaitGroup
	won := make([]bool, holders)
	terms := make([]uint64, holders)
	for i, s := range stores {
		wg.Go(func() {
			m, held, err := s.Acquire(context.Background(), fmt.Sprint("h", i), 0, time.Minute, fmt.Sprint("e", i))
			require.NoError(t, err)
			won[i], terms[i] = held, m.Term
		})
	}
	wg.Wait()
	winners := 0
	for i := range won {
		if won[i] {
			winners++
		}
		require.Equal(t, uint64(1), terms[i], "everyone sees the winner's term")
	}
	require.Equal(t, 1, winners)
}

func TestExpiredLeaseIsTakenOverAndFenced(t *testing.T) {
	clustertest.CheckGoroutines(t)
	r := clustertest.StartRedis(t)
	s := open(t, provision(t, r.URL()), "feed", replay.Limits{})
	ctx := context.Background()

	old, held, err := s.Acquire(ctx, "a", 0, 50*time.Millisecond, "e1")
	require.NoError(t, err)
	require.True(t, held)
	require.NoError(t, s.Append(ctx, old.Epoch, old.Term, entries(1, 2), []byte("s1")))

	var m cluster.Meta
	require.Eventually(t, func() bool {
		m, held, err = s.Acquire(ctx, "b", 0, time.Minute, "e2")
		require.NoError(t, err)
		return held
	}, 5*time.Second, 10*time.Millisecond, "the lease expires")
	require.Equal(t, cluster.Meta{Epoch: "e1", Term: 2, LastSeq: 2, State: []byte("s1")}, m,
		"the new holder continues the epoch with the stored state")

	require.ErrorIs(t, s.Append(ctx, old.Epoch, old.Term, entries(3, 3), []byte("stale")), cluster.ErrFenced)
	_, held, err = s.Acquire(ctx, "a", old.Term, time.Minute, "")
	require.NoError(t, err)
	require.False(t, held, "the old holder cannot renew")

	require.NoError(t, s.Append(ctx, m.Epoch, m.Term, entries(3, 3), []byte("s2")))
	_, es := readAll(t, s)
	require.Equal(t, []uint64{1, 2, 3}, seqs(es))
}

func TestAppendIsIdempotent(t *testing.T) {
	clustertest.CheckGoroutines(t)
	_, s, m := leased(t, replay.Limits{})
	ctx := context.Background()

	require.NoError(t, s.Append(ctx, m.Epoch, m.Term, entries(1, 3), []byte("s1")))
	require.NoError(t, s.Append(ctx, m.Epoch, m.Term, entries(1, 3), []byte("s1")), "a retry")
	require.NoError(t, s.Append(ctx, m.Epoch, m.Term, entries(2, 5), []byte("s2")), "a retry that goes further")
	require.ErrorContains(t, s.Append(ctx, m.Epoch, m.Term, entries(7, 7), nil), "does not follow")
	require.NoError(t, s.Append(ctx, m.Epoch, m.Term, nil, []byte("s3")), "state alone")

	meta, es := readAll(t, s)
	require.Equal(t, cluster.Meta{Epoch: "e1", Term: 1, LastSeq: 5}, meta)
	require.Equal(t, entries(1, 5), es)
	m, _, err := s.Acquire(ctx, "a", 0, time.Minute, "")
	require.NoError(t, err)
	require.Equal(t, []byte("s3"), m.State)

	_, es, err = s.Read(ctx, 3, 1)
	require.NoError(t, err)
	require.Equal(t, entries(4, 4), es, "read after a position, counted")
}

func TestAppendTrims(t *testing.T) {
	for _, tc := range []struct {
		name   string
		limits replay.Limits
		// batches are appended in turn, with pause between them.
		batches [][]cluster.Entry
		pause   time.Duration
		want    []uint64
	}{
		{
			name:    "count",
			limits:  replay.Limits{Count: 3},
			batches: [][]cluster.Entry{entries(1, 2), entries(3, 5), entries(6, 6)},
			want:    []uint64{4, 5, 6},
		},
		{
			name:    "count in one batch larger than the limit",
			limits:  replay.Limits{Count: 2},
			batches: [][]cluster.Entry{entries(1, 200)},
			want:    []uint64{199, 200},
		},
		{
			// Each entry has 5 or 6 bytes: data1...data9, data10...
			name:    "bytes",
			limits:  replay.Limits{Bytes: 15},
			batches: [][]cluster.Entry{entries(1, 4), entries(5, 10)},
			want:    []uint64{9, 10},
		},
		{
			name:    "bytes keep the newest however large",
			limits:  replay.Limits{Bytes: 3},
			batches: [][]cluster.Entry{entries(1, 3)},
			want:    []uint64{3},
		},
		{
			name:    "age",
			limits:  replay.Limits{MaxAge: 100 * time.Millisecond},
			batches: [][]cluster.Entry{entries(1, 3), entries(4, 5)},
			pause:   150 * time.Millisecond,
			want:    []uint64{4, 5},
		},
		{
			name:    "age keeps the newest",
			limits:  replay.Limits{MaxAge: 100 * time.Millisecond},
			batches: [][]cluster.Entry{entries(1, 3), nil},
			pause:   150 * time.Millisecond,
			want:    []uint64{3},
		},
		{
			name:    "no limits",
			batches: [][]cluster.Entry{entries(1, 3), entries(4, 5)},
			want:    []uint64{1, 2, 3, 4, 5},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, s, m := leased(t, tc.limits)
			ctx := context.Background()
			for i, batch := range tc.batches {
				if i > 0 {
					time.Sleep(tc.pause) // Redis's clock, which synctest cannot move
				}
				require.NoError(t, s.Append(ctx, m.Epoch, m.Term, batch, nil))
			}
			_, es := readAll(t, s)
			require.Equal(t, tc.want, seqs(es))

			// The byte total stays exact across trims.
			total := 0
			for _, e := range es {
				total += len(e.Bytes)
			}
			bytes, err := rawClient(t, r).HGet(ctx, s.(*store).meta, "bytes").Int()
			require.NoError(t, err)
			require.Equal(t, total, bytes)
		})
	}
}

func TestReadLeavesOutEntriesPastTheAgeLimit(t *testing.T) {
	clustertest.CheckGoroutines(t)
	_, s, m := leased(t, replay.Limits{MaxAge: 100 * time.Millisecond})
	ctx := context.Background()
	require.NoError(t, s.Append(ctx, m.Epoch, m.Term, entries(1, 3), nil))
	_, es := readAll(t, s)
	require.Equal(t, []uint64{1, 2, 3}, seqs(es))
	time.Sleep(150 * time.Millisecond) // Redis's clock
	meta, es := readAll(t, s)
	require.Equal(t, []uint64{3}, seqs(es), "only the newest, as the local log keeps it")
	require.Equal(t, uint64(3), meta.LastSeq)
}

func TestLostDataStartsANewEpoch(t *testing.T) {
	for _, tc := range []struct {
		name string
		lose func(t *testing.T, r *clustertest.Redis)
	}{
		{"flushall", func(t *testing.T, r *clustertest.Redis) {
			require.NoError(t, rawClient(t, r).FlushAll(context.Background()).Err())
		}},
		{"restart without persistence", func(t *testing.T, r *clustertest.Redis) { r.Restart() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clustertest.CheckGoroutines(t)
			r, s, old := leased(t, replay.Limits{})
			ctx := context.Background()
			require.NoError(t, s.Append(ctx, old.Epoch, old.Term, entries(1, 3), []byte("s1")))

			tc.lose(t, r)

			var err error
			require.Eventually(t, func() bool {
				err = s.Append(ctx, old.Epoch, old.Term, entries(4, 4), []byte("s2"))
				return err == nil || err == cluster.ErrEpoch
			}, 5*time.Second, 10*time.Millisecond, "Redis answers again")
			require.ErrorIs(t, err, cluster.ErrEpoch)
			_, held, err := s.Acquire(ctx, "a", old.Term, time.Minute, "")
			require.NoError(t, err)
			require.False(t, held, "the lease went with the data")
			meta, es := readAll(t, s)
			require.Equal(t, cluster.Meta{}, meta, "no epoch until a holder starts one")
			require.Empty(t, es)

			m, held, err := s.Acquire(ctx, "a", 0, time.Minute, "e2")
			require.NoError(t, err)
			require.True(t, held)
			require.Equal(t, cluster.Meta{Epoch: "e2", Term: 1}, m, "a new epoch, no state")
			require.ErrorIs(t, s.Append(ctx, old.Epoch, m.Term, entries(1, 1), nil), cluster.ErrEpoch,
				"an append of the old epoch is refused even with the current term")
			require.NoError(t, s.Append(ctx, m.Epoch, m.Term, entries(1, 1), nil))
			meta, es = readAll(t, s)
			require.Equal(t, cluster.Meta{Epoch: "e2", Term: 1, LastSeq: 1}, meta)
			require.Equal(t, entries(1, 1), es)
		})
	}
}

func TestAcquireDiscardsALogWithoutMeta(t *testing.T) {
	clustertest.CheckGoroutines(t)
	r, s, old := leased(t, replay.Limits{})
	ctx := context.Background()
	require.NoError(t, s.Append(ctx, old.Epoch, old.Term, entries(1, 3), nil))
	// As when Redis evicts the meta alone.
	require.NoError(t, rawClient(t, r).Del(ctx, s.(*store).meta).Err())

	m, held, err := s.Acquire(ctx, "a", 0, time.Minute, "e2")
	require.NoError(t, err)
	require.True(t, held)
	require.Equal(t, cluster.Meta{Epoch: "e2", Term: 1}, m)
	require.NoError(t, s.Append(ctx, m.Epoch, m.Term, entries(1, 1), nil), "seq 1 again, in a fresh log")
	_, es := readAll(t, s)
	require.Equal(t, entries(1, 1), es)
}

func TestFeedsAreApart(t *testing.T) {
	clustertest.CheckGoroutines(t)
	r := clustertest.StartRedis(t)
	c := provision(t, r.URL())
	a, b := open(t, c, "feed a", replay.Limits{}), open(t, c, "feed b", replay.Limits{})
	ctx := context.Background()
	ma, _, err := a.Acquire(ctx, "h", 0, time.Minute, "ea")
	require.NoError(t, err)
	mb, held, err := b.Acquire(ctx, "h", 0, time.Minute, "eb")
	require.NoError(t, err)
	require.True(t, held, "one lease per feed")
	require.NoError(t, a.Append(ctx, ma.Epoch, ma.Term, entries(1, 2), nil))
	require.NoError(t, b.Append(ctx, mb.Epoch, mb.Term, entries(1, 1), nil))
	metaA, esA := readAll(t, a)
	metaB, esB := readAll(t, b)
	require.Equal(t, "ea", metaA.Epoch)
	require.Equal(t, "eb", metaB.Epoch)
	require.Len(t, esA, 2)
	require.Len(t, esB, 1)
}

func TestParserKeepsTheFirstError(t *testing.T) {
	for _, tc := range []struct {
		name  string
		reply []any
		err   string
	}{
		{"short", []any{"e"}, "unexpected script reply: reply has 1 values, want more than 1"},
		{"not a number", []any{"e", "x", int64(1)}, `unexpected script reply: reply value 1: strconv.ParseUint: parsing "x": invalid syntax`},
		{"not a string", []any{int64(1), int64(2), int64(3)}, "unexpected script reply: reply value 0 is int64, want a string"},
		{"not a list", []any{"e", int64(2), "3", "entries"}, "unexpected script reply: reply value 3 is string, want an array"},
		{"fine", []any{nil, "2", int64(3), []any{}}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var p parser
			p.text(tc.reply, 0)
			p.number(tc.reply, 1)
			p.number(tc.reply, 2)
			p.list(tc.reply, 3)
			if tc.err == "" {
				require.NoError(t, p.err)
				return
			}
			require.EqualError(t, p.err, tc.err)
		})
	}
}
