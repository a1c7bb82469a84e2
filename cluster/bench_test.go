package cluster_test

import (
	"context"
	"strconv"
	"strings"
	"testing"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/cluster"
	"github.com/ssefeed/caddy-ssefeed/internal/clustertest"
)

// BenchmarkAppendToMirror measures one event's way: the holder's append,
// the wake-up hint, and the mirror's read into its local log, on a unix
// socket. It reports the Redis commands per event, as the server counts
// them (a script's inner commands included), and the round trips.
func BenchmarkAppendToMirror(b *testing.B) {
	r := clustertest.StartRedis(b)
	c := backend(b, r.URL())
	w := &writer{t: b, store: open(b, c)}
	w.take()
	m, _ := runMirror(b, open(b, c), nil)
	options, err := redis.ParseURL(r.URL())
	require.NoError(b, err)
	stats := redis.NewClient(options)
	defer stats.Close()
	before := commandCounts(b, stats)

	ctx := context.Background()
	for b.Loop() {
		w.meta.LastSeq++
		e := cluster.Entry{Seq: w.meta.LastSeq, ID: strconv.FormatUint(w.meta.LastSeq, 10), Bytes: []byte("data: {\"price\":1}\n\n")}
		if err := w.store.Append(ctx, w.meta.Epoch, w.meta.Term, []cluster.Entry{e}, []byte(`{"etag":"x"}`)); err != nil {
			b.Fatal(err)
		}
		if err := m.Wait(ctx, w.meta.Epoch, w.meta.LastSeq); err != nil {
			b.Fatal(err)
		}
	}

	after := commandCounts(b, stats)
	n := float64(b.N)
	b.ReportMetric(float64(after["evalsha"]-before["evalsha"])/n, "scripts/op")
	b.ReportMetric(float64(after["total"]-before["total"]-after["info"]+before["info"])/n, "commands/op")
}

// commandCounts returns the server's calls per command, and their total.
func commandCounts(b *testing.B, rdb *redis.Client) map[string]int {
	info, err := rdb.Info(context.Background(), "commandstats").Result()
	require.NoError(b, err)
	counts := map[string]int{}
	for line := range strings.Lines(info) {
		name, rest, ok := strings.Cut(strings.TrimPrefix(line, "cmdstat_"), ":calls=")
		if !ok {
			continue
		}
		calls, _, _ := strings.Cut(rest, ",")
		n, err := strconv.Atoi(calls)
		require.NoError(b, err)
		counts[name] = n
		counts["total"] += n
	}
	return counts
}
