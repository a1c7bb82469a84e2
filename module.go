// Package ssefeed is a Caddy HTTP handler that turns a polled JSON API or an
// NDJSON stream into Server-Sent Events: one upstream reader per feed, every
// event flushed to every subscriber as it exists, and resumption from a
// bounded replay log.
package ssefeed

import (
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/ssefeed/caddy-ssefeed/cluster"
	// The redis cluster backend, so that builds with this module have it.
	_ "github.com/ssefeed/caddy-ssefeed/cluster/redis"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Defaults of the options.
const (
	defaultInterval    = 2 * time.Second
	defaultTimeout     = 10 * time.Second
	defaultMaxBody     = 8 << 20
	defaultReadTimeout = 2 * time.Minute
	defaultHeartbeat   = 15 * time.Second
	defaultReplay      = 1000
	defaultReplayBytes = 16 << 20

	defaultPerRequestReplay      = 100
	defaultPerRequestReplayBytes = 256 << 10
	defaultMaxFeeds              = 1000
	defaultMaxConcurrentRequests = 64
	defaultResetEvent            = "reset"
	defaultLinger                = 30 * time.Second
)

// Handler serves a feed of Server-Sent Events read from an upstream JSON API
// (`poll`) or NDJSON stream (`tail`). Exactly one of poll and tail is set.
// All handlers with the same FeedConfig share one feed: one upstream reader
// and one replay log, kept across config reloads.
type Handler struct {
	FeedConfig

	// Retry is sent once as `retry:` at the start of each stream. Default:
	// none, so clients use their own (about 3s in browsers).
	Retry caddy.Duration `json:"retry,omitempty"`
	// Heartbeat is how long a stream may be silent before a comment line is
	// sent; negative turns heartbeats off. Default: 15s.
	Heartbeat caddy.Duration `json:"heartbeat,omitempty"`
	// HeartbeatEvent, when set, sends heartbeats as events of this name
	// with empty data and no id, so that JavaScript can see them. Default:
	// none.
	HeartbeatEvent string `json:"heartbeat_event,omitempty"`
	// Initial is how many of the newest events a subscriber that brings no
	// Last-Event-ID gets first. Default: 1 for a document feed, 0 otherwise.
	Initial *int `json:"initial,omitempty"`
	// ResetEvent names the event sent to a subscriber whose Last-Event-ID is
	// unknown; its data is {"last_event_id": "<id>"}. Default: reset.
	ResetEvent string `json:"reset_event,omitempty"`
	// FlushInterval, when set, wakes each subscriber at most once per
	// interval, to take everything that arrived meanwhile in one write and
	// one flush: for fast feeds, fewer writes at the cost of up to this
	// much latency. The first event after a quiet interval goes out at
	// once. Heartbeats, resumption and the slow-subscriber rules are
	// unchanged. Default: 0, every event is flushed the moment it exists.
	FlushInterval caddy.Duration `json:"flush_interval,omitempty"`
	// MaxSubscribers limits the feed's concurrent subscribers; others get a
	// 200 with a jittered `retry:` and an ended stream. Default: 0, no limit.
	MaxSubscribers int `json:"max_subscribers,omitempty"`

	// feed serves every request, or set holds a feed per distinct binding
	// of the upstream's request placeholders.
	feed    *feed
	set     *feedSet
	feedKey string
	logger  *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.sse_feed",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision applies defaults and joins the handler to its feed, or to its
// set of per-request feeds, creating it if no other handler has it. It
// starts no goroutine: a feed starts reading when its first subscriber
// arrives.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	tmpl, err := h.template()
	if err != nil {
		return err
	}
	h.applyDefaults(tmpl.PerRequest())
	if err := h.Validate(); err != nil {
		return err
	}
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %v", err)
	}
	events, err := ctx.App("events")
	if err != nil {
		return fmt.Errorf("loading events app: %v", err)
	}
	if err := events.(*caddyevents.App).On("stopping", stoppingHandler{}); err != nil {
		return err
	}

	// The key is taken before the cluster module is loaded, which empties
	// its raw config.
	if h.feedKey, err = jsonKey(&h.FeedConfig); err != nil {
		return err
	}
	var backend cluster.Backend
	if h.ClusterRaw != nil {
		mod, err := ctx.LoadModule(&h.FeedConfig, "ClusterRaw")
		if err != nil {
			return fmt.Errorf("loading cluster module: %v", err)
		}
		backend = mod.(cluster.Backend)
	}
	value, _, err := feeds.LoadOrNew(h.feedKey, func() (caddy.Destructor, error) {
		if tmpl.PerRequest() {
			return newFeedSet(h.FeedConfig, tmpl, backend, h.feedKey, h.logger)
		}
		return h.FeedConfig.newFeed(h.logger, backend, h.feedKey, nil, nil)
	})
	if err != nil {
		return err
	}
	switch v := value.(type) {
	case *feedSet:
		h.set = v
	case *feed:
		h.feed = v
	}
	return nil
}

// applyDefaults fills in the options left unset.
func (h *Handler) applyDefaults(perRequest bool) {
	h.FeedConfig.applyDefaults(perRequest)
	if h.Heartbeat == 0 {
		h.Heartbeat = caddy.Duration(defaultHeartbeat)
	}
	if h.Initial == nil {
		initial := 0
		if h.kind() == documentFeed {
			initial = 1
		}
		h.Initial = &initial
	}
	if h.ResetEvent == "" {
		h.ResetEvent = defaultResetEvent
	}
}

// Validate checks the configuration.
func (h *Handler) Validate() error {
	if err := h.FeedConfig.validate(); err != nil {
		return err
	}
	switch {
	case h.Retry < 0, h.FlushInterval < 0:
		return fmt.Errorf("retry and flush_interval must not be negative")
	case h.MaxSubscribers < 0:
		return fmt.Errorf("max_subscribers must not be negative")
	case h.Initial != nil && *h.Initial < 0:
		return fmt.Errorf("initial must not be negative")
	}
	for name, v := range map[string]string{"reset_event": h.ResetEvent, "heartbeat_event": h.HeartbeatEvent} {
		if !validEventType(v) {
			return fmt.Errorf("%s must be one line of UTF-8", name)
		}
	}
	return nil
}

// subscribe admits r's subscriber to the feed that serves it: the
// handler's one feed, or the per-request feed of r's values. It fails with
// errOverCapacity when the subscriber must be turned away, and with a
// handler error for a request whose values cannot be used.
func (h *Handler) subscribe(r *http.Request) (*feed, admission, error) {
	if h.set != nil {
		return h.set.subscribe(r, h.MaxSubscribers)
	}
	a, ok := h.feed.subscribe(h.MaxSubscribers)
	if !ok {
		return nil, a, errOverCapacity
	}
	return h.feed, a, nil
}

// Cleanup releases the handler's hold on its feed; the feed stops, and its
// streams end, when no config uses it any more.
func (h *Handler) Cleanup() error {
	if h.feed == nil && h.set == nil {
		return nil
	}
	_, err := feeds.Delete(h.feedKey)
	return err
}

// jsonKey returns the canonical JSON form of v, to key a usage pool.
func jsonKey(v any) (string, error) {
	key, err := json.Marshal(v)
	return string(key), err
}

// Interface guards.
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
	_ caddyfile.Unmarshaler       = (*Handler)(nil)
)
