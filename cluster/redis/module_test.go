package rediscluster

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/internal/clustertest"
	"github.com/ssefeed/caddy-ssefeed/replay"
)

func TestUnmarshalCaddyfile(t *testing.T) {
	for _, tc := range []struct {
		name  string
		input string
		want  string // JSON, if no error
		err   string
	}{
		{
			name: "all options",
			input: `redis {
				address redis://user:secret@10.0.0.5:6379/2
				key_prefix feeds
				lease 2s
			}`,
			want: `{"address":"redis://user:secret@10.0.0.5:6379/2","key_prefix":"feeds","lease":2000000000}`,
		},
		{name: "defaults", input: `redis`, want: `{}`},
		{name: "empty block", input: "redis {\n}", want: `{}`},
		{name: "unix socket", input: "redis {\naddress unix:///run/redis.sock?db=1\n}", want: `{"address":"unix:///run/redis.sock?db=1"}`},
		{name: "argument after the name", input: `redis redis://localhost`, err: "wrong argument count or unexpected line ending after 'redis://localhost', at Testfile:1"},
		{name: "unknown option", input: "redis {\n\tpassword x\n}", err: `unknown cluster redis option "password", at Testfile:2`},
		{name: "missing value", input: "redis {\n\taddress\n}", err: "wrong argument count or unexpected line ending after 'address', at Testfile:2"},
		{name: "two values", input: "redis {\n\tkey_prefix a b\n}", err: "wrong argument count or unexpected line ending after 'b', at Testfile:2"},
		{name: "bad lease", input: "redis {\n\n\tlease soon\n}", err: `lease: time: invalid duration "soon", at Testfile:3`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var c Cluster
			err := c.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			if tc.err != "" {
				require.EqualError(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			got, err := json.Marshal(c)
			require.NoError(t, err)
			require.JSONEq(t, tc.want, string(got))
		})
	}
}

func FuzzUnmarshalCaddyfile(f *testing.F) {
	f.Add("redis {\naddress redis://localhost:6379\nkey_prefix p\nlease 10s\n}")
	f.Add("redis {\nlease 1h2m\n}")
	f.Add("redis x {\n}")
	f.Fuzz(func(t *testing.T, input string) {
		var c Cluster
		if err := c.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err != nil {
			return
		}
		// What parsed is valid JSON config again.
		data, err := json.Marshal(c)
		require.NoError(t, err)
		var back Cluster
		require.NoError(t, json.Unmarshal(data, &back))
		require.Equal(t, c, back)
	})
}

func TestProvisionSetsDefaultsAndValidates(t *testing.T) {
	for _, tc := range []struct {
		name    string
		cluster Cluster
		network string // of the parsed address, if no error
		addr    string
		tls     bool
		err     string
	}{
		{name: "defaults", cluster: Cluster{}, network: "tcp", addr: "localhost:6379"},
		{name: "tls", cluster: Cluster{Address: "rediss://user:pw@redis.internal:6380/1"}, network: "tcp", addr: "redis.internal:6380", tls: true},
		{name: "unix", cluster: Cluster{Address: "unix:///run/redis.sock?db=2"}, network: "unix", addr: "/run/redis.sock"},
		{name: "placeholder", cluster: Cluster{Address: "{env.SSEFEED_TEST_REDIS_URL}"}, network: "tcp", addr: "10.0.0.5:6379"},
		{name: "scheme", cluster: Cluster{Address: "http://localhost"}, err: "address: redis: invalid URL scheme: http"},
		{name: "db", cluster: Cluster{Address: "redis://localhost/x"}, err: `address: redis: invalid database number: "x"`},
		{name: "braces", cluster: Cluster{KeyPrefix: "a{b}"}, err: "key_prefix must not contain { or }: they choose the Redis hash slot"},
		{name: "lease", cluster: Cluster{Lease: caddy.Duration(99 * time.Millisecond)}, err: "lease must be at least 100ms"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clustertest.CheckGoroutines(t)
			t.Setenv("SSEFEED_TEST_REDIS_URL", "redis://10.0.0.5:6379/3")
			c := tc.cluster
			err := c.Provision(caddy.Context{})
			if err == nil {
				err = c.Validate()
			}
			require.NoError(t, c.Cleanup())
			if tc.err != "" {
				require.EqualError(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.network, c.options.Network)
			require.Equal(t, tc.addr, c.options.Addr)
			require.Equal(t, tc.tls, c.options.TLSConfig != nil)
			require.Equal(t, "sse_feed", c.KeyPrefix)
			require.Equal(t, 10*time.Second, c.LeaseTTL())
		})
	}
}

func TestRedisDown(t *testing.T) {
	clustertest.CheckGoroutines(t)
	c := provision(t, "unix://"+t.TempDir()+"/nothing.sock")
	s := open(t, c, "feed", replay.Limits{})
	hints := s.Hints() // listening does not wait for Redis
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	_, _, err := s.Read(ctx, 0, 10)
	require.ErrorContains(t, err, "nothing.sock")
	t.Log("a read fails after", time.Since(start))
	_, _, err = s.Acquire(ctx, "a", 0, time.Second, "e")
	require.Error(t, err)
	require.Error(t, s.Append(ctx, "e", 1, entries(1, 1), nil))
	select {
	case <-hints:
		t.Fatal("a hint without Redis")
	default:
	}
}

func TestConnectionIsSharedUntilTheLastUser(t *testing.T) {
	clustertest.CheckGoroutines(t)
	r := clustertest.StartRedis(t)
	a, b := &Cluster{Address: r.URL()}, &Cluster{Address: r.URL()}
	require.NoError(t, a.Provision(caddy.Context{}))
	require.NoError(t, b.Provision(caddy.Context{}))
	refs := func() int {
		n, _ := conns.References(r.URL())
		return n
	}
	require.Equal(t, 2, refs())

	s := a.Open("feed", replay.Limits{})
	require.Equal(t, 3, refs(), "an open store holds the connection")
	value, _, _ := conns.LoadOrNew(r.URL(), nil)
	shared := value.(*conn)
	_, _ = conns.Delete(r.URL())
	require.Same(t, shared, s.(*store).conn)
	require.Nil(t, shared.rdb, "no client before first use")

	ctx := context.Background()
	m, _, err := s.Acquire(ctx, "a", 0, time.Minute, "e1")
	require.NoError(t, err)
	require.NoError(t, a.Cleanup())
	require.NoError(t, b.Cleanup())
	require.Equal(t, 1, refs())
	require.NoError(t, s.Append(ctx, m.Epoch, m.Term, entries(1, 1), nil),
		"the store works after the configs that opened it are cleaned up")
	require.NoError(t, s.Close())
	require.NoError(t, s.Close(), "closing twice")
	require.Equal(t, 0, refs())
}

func TestHints(t *testing.T) {
	clustertest.CheckGoroutines(t)
	r := clustertest.StartRedis(t)
	c := provision(t, r.URL())
	writer := open(t, c, "feed", replay.Limits{})
	reader := open(t, c, "feed", replay.Limits{})
	other := open(t, c, "other feed", replay.Limits{})
	ctx := context.Background()

	hints := reader.Hints()
	require.Equal(t, hints, reader.Hints(), "one channel per store")
	otherHints := other.Hints()
	// Every subscription starts with a hint, since hints may have been
	// missed before it.
	receive(t, hints)
	receive(t, otherHints)

	m, _, err := writer.Acquire(ctx, "w", 0, time.Minute, "e1")
	require.NoError(t, err)
	for seq := uint64(1); seq <= 3; seq++ {
		require.NoError(t, writer.Append(ctx, m.Epoch, m.Term, entries(seq, seq), nil))
	}
	receive(t, hints)
	select {
	case <-otherHints:
		t.Fatal("a hint for another feed")
	case <-time.After(100 * time.Millisecond):
	}
	select { // a hint of the three appends may still be pending
	case <-hints:
	default:
	}
	require.NoError(t, writer.Append(ctx, m.Epoch, m.Term, nil, []byte("state")))
	require.NoError(t, writer.Append(ctx, m.Epoch, m.Term, entries(3, 3), nil))
	select {
	case <-hints:
		t.Fatal("a hint for an append that added nothing")
	case <-time.After(100 * time.Millisecond):
	}

	// Redis comes back empty: the subscription too, with a hint.
	r.Restart()
	receive(t, hints)
	m, _, err = writer.Acquire(ctx, "w", 0, time.Minute, "e2")
	require.NoError(t, err)
	require.NoError(t, writer.Append(ctx, m.Epoch, m.Term, entries(1, 1), nil))
	receive(t, hints)
}

// receive waits for a hint.
func receive(t *testing.T, hints <-chan struct{}) {
	t.Helper()
	select {
	case <-hints:
	case <-time.After(10 * time.Second):
		t.Fatal("no hint within 10s")
	}
}
