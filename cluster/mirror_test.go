package cluster

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"github.com/ssefeed/caddy-ssefeed/internal/clustertest"
	"github.com/stretchr/testify/require"
)

// numbered returns entries first to last with ids <prefix><seq>.
func numbered(prefix string, first, last uint64) []Entry {
	var es []Entry
	for seq := first; seq <= last; seq++ {
		es = append(es, Entry{Seq: seq, ID: fmt.Sprint(prefix, seq), Bytes: []byte("x")})
	}
	return es
}

// ids returns <prefix><seq> for first to last.
func ids(prefix string, first, last uint64) []string {
	var out []string
	for _, e := range numbered(prefix, first, last) {
		out = append(out, e.ID)
	}
	return out
}

// mirror starts a Mirror of s into a recorder and returns them, with the
// function that stops the mirror and waits for it.
func mirror(s Store, obs Observer) (*Mirror, *clustertest.Recorder, func()) {
	rec := &clustertest.Recorder{}
	m := &Mirror{Store: s, Log: rec, Reset: rec.Reset, Batch: 4, Observer: obs}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		m.Run(ctx)
	}()
	return m, rec, func() {
		cancel()
		<-done
	}
}

// start takes the lease of s and returns its meta.
func start(t *testing.T, s *memStore, epoch string) Meta {
	t.Helper()
	m, held, err := s.Acquire(t.Context(), "writer", 0, time.Hour, epoch)
	require.NoError(t, err)
	require.True(t, held)
	return m
}

func TestMirrorReadsOnHintsAndEveryInterval(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newMemStore()
		m := start(t, s, "a")
		require.NoError(t, s.Append(t.Context(), m.Epoch, m.Term, numbered("a", 1, 10), nil))
		mr, rec, stop := mirror(s, nil)
		defer stop()
		<-mr.Ready()
		require.Equal(t, ids("a", 1, 10), rec.Got(), "what the log has at the start, in batches, when ready")

		require.NoError(t, s.Append(t.Context(), m.Epoch, m.Term, numbered("a", 11, 11), nil))
		synctest.Wait()
		require.Equal(t, ids("a", 1, 11), rec.Got(), "at once on a hint")

		s.set(func(s *memStore) { s.muted = true })
		require.NoError(t, s.Append(t.Context(), m.Epoch, m.Term, numbered("a", 12, 12), nil))
		synctest.Wait()
		require.Equal(t, ids("a", 1, 11), rec.Got())
		time.Sleep(time.Second)
		synctest.Wait()
		require.Equal(t, ids("a", 1, 12), rec.Got(), "a lost hint costs at most the interval")
	})
}

func TestMirrorResetsOnANewEpoch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newMemStore()
		m := start(t, s, "a")
		require.NoError(t, s.Append(t.Context(), m.Epoch, m.Term, numbered("a", 1, 3), nil))
		_, rec, stop := mirror(s, nil)
		defer stop()
		synctest.Wait()

		// The store loses everything; no holder yet.
		s.set(func(s *memStore) { s.epoch, s.holder, s.entries = "", "", nil })
		time.Sleep(2 * time.Second)
		synctest.Wait()
		require.Equal(t, ids("a", 1, 3), rec.Got(), "nothing to do before a new epoch")

		m = start(t, s, "b")
		require.NoError(t, s.Append(t.Context(), m.Epoch, m.Term, numbered("b", 1, 5), nil))
		synctest.Wait()
		require.Equal(t, slices.Concat(ids("a", 1, 3), []string{"reset b"}, ids("b", 1, 5)), rec.Got())
	})
}

func TestMirrorResetsWhenItMissedTrimmedEntries(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newMemStore()
		m := start(t, s, "a")
		require.NoError(t, s.Append(t.Context(), m.Epoch, m.Term, numbered("a", 1, 3), nil))
		_, rec, stop := mirror(s, nil)
		defer stop()
		synctest.Wait()

		s.set(func(s *memStore) { s.muted = true })
		require.NoError(t, s.Append(t.Context(), m.Epoch, m.Term, numbered("a", 4, 9), nil))
		s.set(func(s *memStore) { s.entries = s.entries[7:] }) // trimmed to 8 and 9 before the mirror read
		time.Sleep(time.Second)
		synctest.Wait()
		require.Equal(t, slices.Concat(ids("a", 1, 3), []string{"reset a"}, ids("a", 8, 9)), rec.Got())
	})
}

func TestMirrorStartsOnATrimmedLogWithoutReset(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newMemStore()
		m := start(t, s, "a")
		require.NoError(t, s.Append(t.Context(), m.Epoch, m.Term, numbered("a", 1, 9), nil))
		s.set(func(s *memStore) { s.entries = s.entries[5:] })
		_, rec, stop := mirror(s, nil)
		defer stop()
		synctest.Wait()
		require.Equal(t, ids("a", 6, 9), rec.Got())
	})
}

func TestMirrorRetriesWithBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s, obs := newMemStore(), &clustertest.Observer{}
		m := start(t, s, "a")
		s.set(func(s *memStore) { s.fail = errors.New("redis down") })
		mr, rec, stop := mirror(s, obs)
		defer stop()
		time.Sleep(10 * time.Second)
		synctest.Wait()
		require.False(t, isClosed(mr.Ready()), "not ready before it could read")
		// 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5: give or take a fifth, 7 or 8
		// failures in 10s, the first at once.
		failures := obs.Errors("read")
		require.GreaterOrEqual(t, failures, 7)
		require.LessOrEqual(t, failures, 9)
		require.Equal(t, failures, s.count("read"))

		s.set(func(s *memStore) { s.fail = nil })
		require.NoError(t, s.Append(t.Context(), m.Epoch, m.Term, numbered("a", 1, 2), nil))
		time.Sleep(5 * time.Second)
		synctest.Wait()
		require.Equal(t, ids("a", 1, 2), rec.Got(), "resumed after the backoff")
		require.True(t, isClosed(mr.Ready()))
		require.Equal(t, failures, obs.Errors("read"))
	})
}

func TestMirrorWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newMemStore()
		meta := start(t, s, "a")
		s.set(func(s *memStore) { s.muted = true })
		m, _, stop := mirror(s, nil)
		defer stop()
		synctest.Wait() // the first read, of nothing
		require.NoError(t, s.Append(t.Context(), meta.Epoch, meta.Term, numbered("a", 1, 2), nil))

		ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
		defer cancel()
		require.ErrorIs(t, m.Wait(ctx, "a", 2), context.DeadlineExceeded, "the mirror reads at the next interval")
		begin := time.Now()
		require.NoError(t, m.Wait(t.Context(), "a", 2))
		require.Equal(t, time.Second, time.Since(begin)+100*time.Millisecond)
		require.NoError(t, m.Wait(t.Context(), "a", 1), "passed already")
		ctx, cancel = context.WithTimeout(t.Context(), time.Hour)
		defer cancel()
		require.ErrorIs(t, m.Wait(ctx, "b", 1), context.DeadlineExceeded, "another epoch")
	})
}
