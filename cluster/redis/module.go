// Package rediscluster is the redis guest module of sse_feed's cluster: it
// keeps each feed's shared log, lease and state in a Redis 7 (or Valkey)
// server, one hash slot per feed.
package rediscluster

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/redis/go-redis/v9"

	"github.com/ssefeed/caddy-ssefeed/cluster"
	"github.com/ssefeed/caddy-ssefeed/replay"
)

func init() {
	caddy.RegisterModule(Cluster{})
}

// Cluster shares feeds among Caddy instances through one Redis server:
// one instance at a time reads each feed's upstream and appends to the
// feed's log in Redis, and every instance serves the same events with the
// same ids from its mirror of that log. Provisioning connects to nothing:
// Caddy starts, and `caddy validate` passes, while Redis is down.
type Cluster struct {
	// Address is the Redis server's URL: redis://[[user]:password@]host[:port][/db],
	// rediss:// for TLS, or unix://[[user]:password@]/path/to/redis.sock[?db=db].
	// Query parameters of go-redis URLs such as dial_timeout apply, and
	// global placeholders such as {env.REDIS_URL} are replaced.
	// Default: redis://localhost:6379
	Address string `json:"address,omitempty"`

	// KeyPrefix starts the name of every Redis key and channel the cluster
	// uses. Default: sse_feed
	KeyPrefix string `json:"key_prefix,omitempty"`

	// Lease is how long an instance keeps a feed's upstream reader after
	// it stops renewing its lease, for instance because it died: another
	// instance takes over within this time. It is renewed every third of
	// it. Default: 10s
	Lease caddy.Duration `json:"lease,omitempty"`

	poolKey string
	options *redis.Options
}

// CaddyModule returns the Caddy module information.
func (Cluster) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.sse_feed.clusters.redis",
		New: func() caddy.Module { return new(Cluster) },
	}
}

// Provision sets defaults, parses the address and takes a share of its
// connection, which connects on first use.
func (c *Cluster) Provision(caddy.Context) error {
	if c.Address == "" {
		c.Address = "redis://localhost:6379"
	}
	if c.KeyPrefix == "" {
		c.KeyPrefix = "sse_feed"
	}
	if c.Lease == 0 {
		c.Lease = caddy.Duration(10 * time.Second)
	}
	address := caddy.NewReplacer().ReplaceAll(c.Address, "")
	options, err := redis.ParseURL(address)
	if err != nil {
		return fmt.Errorf("address: %w", err)
	}
	// Contexts bound every command, such as a lease renewal that must end
	// before the lease does.
	options.ContextTimeoutEnabled = true
	c.options = options
	c.poolKey = address
	redirectLog.Do(func() { redis.SetLogger(goRedisLog{}) })
	_, _, err = conns.LoadOrNew(c.poolKey, c.newConn)
	return err
}

func (c *Cluster) newConn() (caddy.Destructor, error) {
	return &conn{options: c.options}, nil
}

// minLease is the shortest lease: it is renewed every third of it.
const minLease = 100 * time.Millisecond

// Validate checks the key prefix and the lease.
func (c *Cluster) Validate() error {
	if strings.ContainsAny(c.KeyPrefix, "{}") {
		return errors.New("key_prefix must not contain { or }: they choose the Redis hash slot")
	}
	if time.Duration(c.Lease) < minLease {
		return fmt.Errorf("lease must be at least %v", minLease)
	}
	return nil
}

// Cleanup lets the connection go; it closes once no config and no open
// store uses it.
func (c *Cluster) Cleanup() error {
	if c.poolKey == "" {
		return nil
	}
	_, err := conns.Delete(c.poolKey)
	return err
}

// Open implements cluster.Backend. The feed's keys are named by a hash of
// feed, so any string is safe.
func (c *Cluster) Open(feed string, limits replay.Limits) cluster.Store {
	value, _, _ := conns.LoadOrNew(c.poolKey, c.newConn)
	sum := sha256.Sum256([]byte(feed))
	base := c.KeyPrefix + ":{" + hex.EncodeToString(sum[:16]) + "}:"
	return newStore(value.(*conn), base, limits, func() { _, _ = conns.Delete(c.poolKey) })
}

// Holder implements cluster.Backend.
func (c *Cluster) Holder() string { return holder }

// LeaseTTL implements cluster.Backend.
func (c *Cluster) LeaseTTL() time.Duration { return time.Duration(c.Lease) }

// holder names this process in leases: host, pid and a random part, since
// pids repeat across restarts and containers.
var holder = func() string {
	host, _ := os.Hostname()
	return host + ":" + strconv.Itoa(os.Getpid()) + ":" + rand.Text()[:8]
}()

// UnmarshalCaddyfile sets up the cluster from Caddyfile tokens:
//
//	redis {
//		address <url>
//		key_prefix <prefix>
//		lease <duration>
//	}
func (c *Cluster) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the module's name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		option := d.Val()
		if !d.NextArg() {
			return d.ArgErr()
		}
		value := d.Val()
		if d.NextArg() {
			return d.ArgErr()
		}
		switch option {
		case "address":
			c.Address = value
		case "key_prefix":
			c.KeyPrefix = value
		case "lease":
			lease, err := caddy.ParseDuration(value)
			if err != nil {
				return d.Errf("lease: %v", err)
			}
			c.Lease = caddy.Duration(lease)
		default:
			return d.Errf("unknown cluster redis option %q", option)
		}
	}
	return nil
}

// Interface guards.
var (
	_ caddy.Provisioner     = (*Cluster)(nil)
	_ caddy.Validator       = (*Cluster)(nil)
	_ caddy.CleanerUpper    = (*Cluster)(nil)
	_ caddyfile.Unmarshaler = (*Cluster)(nil)
	_ cluster.Backend       = (*Cluster)(nil)
)
