// Package ssefeed is a Caddy HTTP handler that turns a polled JSON API or an
// NDJSON stream into Server-Sent Events: one upstream reader per feed, every
// event flushed to every subscriber as it exists, and resumption from a
// bounded replay log.
package ssefeed

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/ssefeed/caddy-ssefeed/pointer"
	"github.com/ssefeed/caddy-ssefeed/replay"
	"github.com/ssefeed/caddy-ssefeed/source"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Defaults of the options.
const (
	defaultInterval    = 2 * time.Second
	defaultTimeout     = 10 * time.Second
	defaultMaxBody     = 8 << 20
	defaultHeartbeat   = 15 * time.Second
	defaultReplay      = 1000
	defaultReplayBytes = 16 << 20
	defaultResetEvent  = "reset"
	defaultLinger      = 30 * time.Second
)

// Handler serves a feed of Server-Sent Events read from an upstream JSON API
// (`poll`) or NDJSON stream (`tail`). Exactly one of poll and tail is set.
// All handlers with the same source and mapping share one feed: one upstream
// reader and one replay log, kept across config reloads.
type Handler struct {
	// Poll is the URL of a JSON document to fetch every interval. It may
	// hold Caddy placeholders and {sse_feed.last_id}. Default: none; exactly
	// one of poll and tail is required.
	Poll string `json:"poll,omitempty"`
	// Interval is the time between polls. Default: 2s.
	Interval caddy.Duration `json:"interval,omitempty"`
	// Tail is the URL of an NDJSON stream to read line by line, reconnecting
	// when it ends. It may hold Caddy placeholders and {sse_feed.last_id}.
	// Default: none; exactly one of poll and tail is required.
	Tail string `json:"tail,omitempty"`

	// Items is a JSON Pointer to the array whose elements are events. Without
	// it a polled document is one event. Default: none.
	Items string `json:"items,omitempty"`
	// ID is a JSON Pointer to an element's id, sent as the event's `id:`.
	// Default: none; ids are generated.
	ID string `json:"id,omitempty"`
	// Type is a JSON Pointer to an element's type, sent as `event:`.
	// Default: none.
	Type string `json:"type,omitempty"`
	// Event is a fixed event name, used when Type is not set or selects
	// nothing. Default: none, so clients see "message" events.
	Event string `json:"event,omitempty"`
	// Data is a JSON Pointer to the part of an element sent as data. A
	// string is sent as text; anything else as compact JSON. Default: "",
	// the whole element.
	Data string `json:"data,omitempty"`
	// Order is how the upstream array is sorted: "oldest_first" or
	// "newest_first". Default: oldest_first.
	Order string `json:"order,omitempty"`

	// Header holds request headers for the upstream. Values may hold Caddy
	// placeholders such as {env.TOKEN} and {sse_feed.last_id}. Default: none.
	Header map[string][]string `json:"header,omitempty"`
	// Timeout bounds one poll request, or a tail request until its response
	// headers. Default: 10s.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// MaxBody bounds a polled body or one NDJSON line, in bytes; larger ones
	// are skipped. Default: 8 MiB.
	MaxBody int64 `json:"max_body,omitempty"`

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
	// Replay is the most events the replay log keeps. Default: 1000.
	Replay int `json:"replay,omitempty"`
	// ReplayMaxAge is the longest the replay log keeps an event. Default:
	// no age bound.
	ReplayMaxAge caddy.Duration `json:"replay_max_age,omitempty"`
	// ReplayBytes bounds the encoded bytes the replay log keeps; the newest
	// event is always kept. Default: 16 MiB.
	ReplayBytes int `json:"replay_bytes,omitempty"`
	// Initial is how many of the newest events a subscriber that brings no
	// Last-Event-ID gets first. Default: 1 for a document feed, 0 otherwise.
	Initial *int `json:"initial,omitempty"`
	// ResetEvent names the event sent to a subscriber whose Last-Event-ID is
	// unknown; its data is {"last_event_id": "<id>"}. Default: reset.
	ResetEvent string `json:"reset_event,omitempty"`
	// MaxSubscribers limits the feed's concurrent subscribers; others get a
	// 200 with a jittered `retry:` and an ended stream. Default: 0, no limit.
	MaxSubscribers int `json:"max_subscribers,omitempty"`
	// Name labels the feed in logs and metrics. Default: the upstream URL's
	// host and path.
	Name string `json:"name,omitempty"`
	// Linger is how long the feed keeps reading its upstream after its last
	// subscriber leaves. Default: 30s.
	Linger caddy.Duration `json:"linger,omitempty"`

	feed     *feed
	feedKey  string
	logger   *zap.Logger
	stopping chan struct{}
	stopOnce *sync.Once
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.sse_feed",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision applies defaults and joins the handler to its feed, creating
// the feed if no other handler has it. It starts no goroutine: a feed starts
// reading when its first subscriber arrives.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	h.stopping = make(chan struct{})
	h.stopOnce = new(sync.Once)
	h.applyDefaults()
	m, err := h.mapping()
	if err != nil {
		return err
	}
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
	if err := events.(*caddyevents.App).On("stopping", stoppingHandler{h}); err != nil {
		return err
	}

	key, err := json.Marshal(h.feedConfig())
	if err != nil {
		return err
	}
	h.feedKey = string(key)
	value, _, err := feeds.LoadOrNew(h.feedKey, func() (caddy.Destructor, error) {
		return h.newFeed(m), nil
	})
	if err != nil {
		return err
	}
	h.feed = value.(*feed)
	return nil
}

// applyDefaults fills in the options left unset.
func (h *Handler) applyDefaults() {
	if h.Interval == 0 {
		h.Interval = caddy.Duration(defaultInterval)
	}
	if h.Timeout == 0 {
		h.Timeout = caddy.Duration(defaultTimeout)
	}
	if h.MaxBody == 0 {
		h.MaxBody = defaultMaxBody
	}
	if h.Heartbeat == 0 {
		h.Heartbeat = caddy.Duration(defaultHeartbeat)
	}
	if h.Replay == 0 {
		h.Replay = defaultReplay
	}
	if h.ReplayBytes == 0 {
		h.ReplayBytes = defaultReplayBytes
	}
	if h.Initial == nil {
		initial := 0
		if h.Poll != "" && h.Items == "" {
			initial = 1
		}
		h.Initial = &initial
	}
	if h.ResetEvent == "" {
		h.ResetEvent = defaultResetEvent
	}
	if h.Linger == 0 {
		h.Linger = caddy.Duration(defaultLinger)
	}
	if h.Name == "" {
		h.Name = defaultName(h.Poll + h.Tail)
	}
}

// defaultName derives a feed's name from its URL: host and path, leaving out
// the query, which may hold secrets.
func defaultName(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil || u.Host == "" {
		return rawURL
	}
	return u.Host + u.Path
}

// Validate checks the configuration.
func (h *Handler) Validate() error {
	switch {
	case h.Poll == "" && h.Tail == "":
		return fmt.Errorf("no source: set poll or tail")
	case h.Poll != "" && h.Tail != "":
		return fmt.Errorf("two sources: set poll or tail, not both")
	case h.Tail != "" && h.Items != "":
		return fmt.Errorf("items applies to poll; each tailed line is already one element")
	case h.Order != "" && h.Order != "oldest_first" && h.Order != "newest_first":
		return fmt.Errorf("order must be oldest_first or newest_first, not %q", h.Order)
	case h.Interval < 0, h.Timeout < 0, h.Retry < 0, h.ReplayMaxAge < 0, h.Linger < 0:
		return fmt.Errorf("durations must not be negative")
	case h.MaxBody < 0, h.Replay < 0, h.ReplayBytes < 0, h.MaxSubscribers < 0:
		return fmt.Errorf("sizes and counts must not be negative")
	case h.Initial != nil && *h.Initial < 0:
		return fmt.Errorf("initial must not be negative")
	}
	for name, v := range map[string]string{"event": h.Event, "reset_event": h.ResetEvent, "heartbeat_event": h.HeartbeatEvent} {
		if !validEventType(v) {
			return fmt.Errorf("%s must be one line of UTF-8", name)
		}
	}
	_, err := h.mapping()
	return err
}

// mapping parses the pointers into a mapping.
func (h *Handler) mapping() (mapping, error) {
	m := mapping{fixedType: h.Event, newestFirst: h.Order == "newest_first"}
	for _, p := range []struct {
		option string
		value  string
		dst    *pointer.Pointer
	}{{"items", h.Items, &m.items}, {"id", h.ID, &m.id}, {"type", h.Type, &m.typ}, {"data", h.Data, &m.data}} {
		if p.value == "" && p.option != "data" {
			continue
		}
		ptr, err := pointer.Parse(p.value)
		if err != nil {
			return m, fmt.Errorf("%s: %v", p.option, err)
		}
		*p.dst = ptr
	}
	return m, nil
}

// feedConfig returns the options that make a feed. Handlers whose feed
// configs are equal share one feed; a reload that changes any of them
// replaces the feed and ends its streams.
func (h *Handler) feedConfig() any {
	return struct {
		Poll, Tail, Items, ID, Type, Event, Data, Order, Name string
		Interval, Timeout, ReplayMaxAge, Linger               caddy.Duration
		Header                                                map[string][]string
		MaxBody                                               int64
		Replay, ReplayBytes                                   int
	}{
		h.Poll, h.Tail, h.Items, h.ID, h.Type, h.Event, h.Data, h.Order, h.Name,
		h.Interval, h.Timeout, h.ReplayMaxAge, h.Linger,
		h.Header, h.MaxBody, h.Replay, h.ReplayBytes,
	}
}

// newFeed builds the handler's feed and its source.
func (h *Handler) newFeed(m mapping) *feed {
	logger := h.logger.With(zap.String("feed", h.Name))
	kind := tailFeed
	if h.Poll != "" {
		kind = documentFeed
		if h.Items != "" {
			kind = itemFeed
		}
	}
	f := newFeed(h.Name, kind, nil, m, replay.Limits{
		Count:  h.Replay,
		Bytes:  h.ReplayBytes,
		MaxAge: time.Duration(h.ReplayMaxAge),
	}, time.Duration(h.Linger), logger)

	cfg := source.Config{
		URL:      h.Poll + h.Tail,
		Header:   h.Header,
		Timeout:  time.Duration(h.Timeout),
		MaxBody:  h.MaxBody,
		Backoff:  source.Backoff{Initial: time.Second, Max: time.Minute},
		Logger:   logger,
		Observer: f.metrics,
	}
	if kind == tailFeed {
		f.source = &source.Tail{Config: cfg}
	} else {
		cfg.Backoff.Initial = time.Duration(h.Interval)
		cfg.Backoff.Max = max(time.Minute, time.Duration(h.Interval))
		f.source = &source.Poll{Config: cfg, Interval: time.Duration(h.Interval)}
	}
	return f
}

// stoppingHandler ends a handler's streams when the process exits, so that
// Caddy's eternal default grace period does not wait for them. On a reload
// streams go on; those of feeds that the reload drops end in Cleanup.
type stoppingHandler struct{ h *Handler }

// Handle implements caddyevents.Handler.
func (s stoppingHandler) Handle(context.Context, caddy.Event) error {
	if caddy.Exiting() {
		s.h.stopOnce.Do(func() { close(s.h.stopping) })
	}
	return nil
}

// Cleanup releases the handler's hold on its feed; the feed stops, ending
// its streams, when no config uses it any more.
func (h *Handler) Cleanup() error {
	if h.feed == nil {
		return nil
	}
	_, err := feeds.Delete(h.feedKey)
	return err
}

// Interface guards.
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
	_ caddyfile.Unmarshaler       = (*Handler)(nil)
)
