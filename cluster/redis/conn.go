package rediscluster

import (
	"context"
	"fmt"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// conns holds one connection per Redis address, shared by every cluster
// module and store using it, across config reloads.
var conns = caddy.NewUsagePool()

// conn is a Redis client and its subscription, both made on first use, so
// that provisioning connects to nothing and starts no goroutine.
type conn struct {
	options *redis.Options

	mu     sync.Mutex
	rdb    *redis.Client
	hub    *hub
	closed bool
}

// client returns the Redis client, making it on first use.
func (c *conn) client() *redis.Client {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.rdb == nil {
		c.rdb = redis.NewClient(c.options)
		if c.closed {
			// Late use of a destructed connection fails like any use of
			// a closed client.
			_ = c.rdb.Close()
		}
	}
	return c.rdb
}

// subscribe returns a channel of wake-up hints for a pub/sub channel, and
// the function that stops them.
func (c *conn) subscribe(channel string) (<-chan struct{}, func()) {
	rdb := c.client()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.hub == nil {
		c.hub = newHub(rdb)
		if c.closed {
			c.hub.close()
		}
	}
	return c.hub.subscribe(channel)
}

// Destruct closes the subscription and the client. The usage pool calls it
// once nothing uses the connection.
func (c *conn) Destruct() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	if c.hub != nil {
		c.hub.close()
	}
	if c.rdb != nil {
		return c.rdb.Close()
	}
	return nil
}

// redirectLog sends go-redis's own log lines, which are global to the
// process, to Caddy's log instead of stderr.
var redirectLog sync.Once

// goRedisLog writes go-redis's log lines, mostly about failing to
// reconnect, at debug level: the cluster logs and counts store errors
// itself, and Redis down must not flood the log.
type goRedisLog struct{}

func (goRedisLog) Printf(_ context.Context, format string, args ...any) {
	logger := caddy.Log().Named("sse_feed.cluster.redis")
	if logger.Core().Enabled(zap.DebugLevel) {
		logger.Debug(fmt.Sprintf(format, args...))
	}
}
