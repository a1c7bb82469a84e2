package ssefeed

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"

	rediscluster "github.com/ssefeed/caddy-ssefeed/cluster/redis"
	"github.com/ssefeed/caddy-ssefeed/internal/clustertest"
)

// itemsUpstream serves {"items": [...]} with the ids it is given, and
// records which instance (the X-Instance header) made each request.
type itemsUpstream struct {
	*httptest.Server
	mu       sync.Mutex
	ids      []int
	pollers  []string
	answered chan struct{}
}

func newItemsUpstream(t *testing.T) *itemsUpstream {
	u := &itemsUpstream{answered: make(chan struct{}, 1)}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		u.pollers = append(u.pollers, r.Header.Get("X-Instance"))
		items := make([]map[string]int, len(u.ids))
		for i, id := range u.ids {
			items[i] = map[string]int{"id": id}
		}
		u.mu.Unlock()
		_ = json.NewEncoder(w).Encode(map[string]any{"items": items})
	}))
	t.Cleanup(u.Close)
	return u
}

// set makes the upstream answer with ids from now on.
func (u *itemsUpstream) set(ids ...int) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.ids = ids
}

// polledBy returns the instances that polled since the last call.
func (u *itemsUpstream) polledBy() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	pollers := slices.Compact(u.pollers)
	u.pollers = nil
	return pollers
}

// sharedFeed builds the feed of instance on backend, as a Caddy instance
// would for the same config: the same key, its own source.
func sharedFeed(t *testing.T, backend *rediscluster.Cluster, up *itemsUpstream, instance string) *feed {
	t.Helper()
	c := FeedConfig{
		Poll: up.URL, Interval: caddy.Duration(20 * time.Millisecond), Items: "/items", ID: "/id",
		Header: map[string][]string{"X-Instance": {instance}}, Linger: caddy.Duration(time.Millisecond),
	}
	c.applyDefaults(false)
	f, err := c.newFeed(zap.NewNop(), backend, "feed of "+t.Name(), nil, nil)
	require.NoError(t, err)
	t.Cleanup(func() { _ = f.Destruct() })
	return f
}

// logged returns the ids and bytes in the feed's log.
func logged(t *testing.T, f *feed) []string {
	t.Helper()
	frames, _, _, _, err := f.log.Read(f.oldest(), nil, 1<<20, 1<<30)
	require.NoError(t, err)
	out := make([]string, len(frames))
	for i, frame := range frames {
		out[i] = string(frame)
	}
	return out
}

func TestClusteredFeedsShareOneReaderOneLogAndFailOver(t *testing.T) {
	redis := clustertest.StartRedis(t)
	backend := &rediscluster.Cluster{Address: redis.URL(), Lease: caddy.Duration(300 * time.Millisecond)}
	require.NoError(t, backend.Provision(caddy.Context{Context: context.Background()}))
	t.Cleanup(func() { _ = backend.Cleanup() })
	up := newItemsUpstream(t)
	up.set(1, 2)
	a, b := sharedFeed(t, backend, up, "a"), sharedFeed(t, backend, up, "b")
	_, okA := a.subscribe(0)
	_, okB := b.subscribe(0)
	require.True(t, okA && okB)

	// Both instances serve the same frames, ids included, from one reader.
	waitUntil(t, "both logs hold the first poll", func() bool { return len(logged(t, a)) == 2 && len(logged(t, b)) == 2 })
	up.set(1, 2, 3)
	waitUntil(t, "both logs hold the news", func() bool { return len(logged(t, a)) == 3 && len(logged(t, b)) == 3 })
	require.Equal(t, logged(t, a), logged(t, b))
	pollers := up.polledBy()
	require.Len(t, pollers, 1, "more than one instance polled: %v", pollers)

	// The holder goes away; the other takes the lease over and continues
	// from the stored state: nothing published twice, nothing lost.
	holder, other := a, b
	if pollers[0] == "b" {
		holder, other = b, a
	}
	before := logged(t, other)
	require.NoError(t, holder.Destruct())
	up.set(2, 3, 4)
	waitUntil(t, "the other instance publishes the news", func() bool { return len(logged(t, other)) == 4 })
	after := logged(t, other)
	require.Equal(t, before, after[:3])
	require.Contains(t, after[3], `"id":4`)
	polls, name := up.polledBy(), map[*feed]string{a: "a", b: "b"}
	require.LessOrEqual(t, len(polls), 2, "the instances took turns: %v", polls)
	require.Equal(t, name[other], polls[len(polls)-1], "after the failover, only the new holder polls")
}
