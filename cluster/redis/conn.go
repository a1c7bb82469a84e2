package rediscluster

import (
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
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
