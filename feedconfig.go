package ssefeed

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/url"
	"time"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/ssefeed/caddy-ssefeed/cluster"
	"github.com/ssefeed/caddy-ssefeed/pointer"
	"github.com/ssefeed/caddy-ssefeed/replay"
	"github.com/ssefeed/caddy-ssefeed/source"
	"github.com/ssefeed/caddy-ssefeed/target"
)

// FeedConfig holds the options that make a feed: its source, its mapping
// and its replay log. Handlers whose FeedConfigs are equal share one feed;
// a reload that changes any of them replaces the feed.
type FeedConfig struct {
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
	// ReadTimeout bounds how long a tailed stream may send nothing, not
	// even a blank line, before it is dropped and reconnected. Default: 2m.
	ReadTimeout caddy.Duration `json:"read_timeout,omitempty"`

	// Replay is the most events the replay log keeps. Default: 1000, or 100
	// for per-request feeds.
	Replay int `json:"replay,omitempty"`
	// ReplayMaxAge is the longest the replay log keeps an event. Default:
	// no age bound.
	ReplayMaxAge caddy.Duration `json:"replay_max_age,omitempty"`
	// ReplayBytes bounds the encoded bytes the replay log keeps; the newest
	// event is always kept. Default: 16 MiB, or 256 KiB for per-request
	// feeds.
	ReplayBytes int `json:"replay_bytes,omitempty"`
	// Name labels the feed in logs and metrics. Default: the upstream URL's
	// host and path.
	Name string `json:"name,omitempty"`
	// Linger is how long the feed keeps reading its upstream after its last
	// subscriber leaves. Default: 30s.
	Linger caddy.Duration `json:"linger,omitempty"`

	// MaxFeeds bounds the live per-request feeds of the handler, when the
	// upstream URL or a header value holds request placeholders; a
	// subscriber that would need one more gets a 200 with a jittered
	// `retry:` and an ended stream. Default: 1000.
	MaxFeeds int `json:"max_feeds,omitempty"`
	// MaxConcurrentRequests bounds the upstream requests in flight for all
	// the handler's per-request feeds; the others wait their turn.
	// Default: 64.
	MaxConcurrentRequests int `json:"max_concurrent_requests,omitempty"`

	// ClusterRaw shares the feed among Caddy instances: one instance at a
	// time reads the upstream, and every instance serves the same events
	// with the same ids from a shared log. Default: none; the feed lives in
	// this process only.
	ClusterRaw json.RawMessage `json:"cluster,omitempty" caddy:"namespace=http.handlers.sse_feed.clusters inline_key=backend"`
}

// applyDefaults fills in the options left unset. Per-request feeds, of
// which a handler may have max_feeds, keep smaller logs.
func (c *FeedConfig) applyDefaults(perRequest bool) {
	if c.Interval == 0 {
		c.Interval = caddy.Duration(defaultInterval)
	}
	if c.Timeout == 0 {
		c.Timeout = caddy.Duration(defaultTimeout)
	}
	if c.MaxBody == 0 {
		c.MaxBody = defaultMaxBody
	}
	if c.ReadTimeout == 0 {
		c.ReadTimeout = caddy.Duration(defaultReadTimeout)
	}
	if c.Replay == 0 {
		c.Replay = defaultReplay
		if perRequest {
			c.Replay = defaultPerRequestReplay
		}
	}
	if c.ReplayBytes == 0 {
		c.ReplayBytes = defaultReplayBytes
		if perRequest {
			c.ReplayBytes = defaultPerRequestReplayBytes
		}
	}
	if c.Linger == 0 {
		c.Linger = caddy.Duration(defaultLinger)
	}
	if perRequest && c.MaxFeeds == 0 {
		c.MaxFeeds = defaultMaxFeeds
	}
	if perRequest && c.MaxConcurrentRequests == 0 {
		c.MaxConcurrentRequests = defaultMaxConcurrentRequests
	}
	if c.Name == "" {
		c.Name = defaultName(c.Poll + c.Tail)
	}
}

// defaultName derives a feed's name from its URL: host and path. The query
// may hold secrets, so a short hash of it stands in its place, keeping
// feeds that differ only in their query apart. A URL that does not parse
// gets no name from its text.
func defaultName(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil || u.Host == "" {
		return "sse_feed"
	}
	name := u.Host + u.EscapedPath()
	if u.RawQuery != "" {
		sum := sha256.Sum256([]byte(u.RawQuery))
		name += "?" + hex.EncodeToString(sum[:3])
	}
	return name
}

// validate checks the options that make a feed.
func (c *FeedConfig) validate() error {
	switch {
	case c.Poll == "" && c.Tail == "":
		return fmt.Errorf("no source: set poll or tail")
	case c.Poll != "" && c.Tail != "":
		return fmt.Errorf("two sources: set poll or tail, not both")
	}
	if _, err := c.template(); err != nil {
		return err
	}
	switch {
	case c.Tail != "" && c.Items != "":
		return fmt.Errorf("items applies to poll; each tailed line is already one element")
	case c.Order != "" && c.Order != "oldest_first" && c.Order != "newest_first":
		return fmt.Errorf("order must be oldest_first or newest_first, not %q", c.Order)
	case c.Interval < 0, c.Timeout < 0, c.ReadTimeout < 0, c.ReplayMaxAge < 0, c.Linger < 0:
		return fmt.Errorf("durations must not be negative")
	case c.MaxBody < 0, c.Replay < 0, c.ReplayBytes < 0, c.MaxFeeds < 0, c.MaxConcurrentRequests < 0:
		return fmt.Errorf("sizes and counts must not be negative")
	case !validEventType(c.Event):
		return fmt.Errorf("event must be one line of UTF-8")
	case !utf8.ValidString(c.Name):
		return fmt.Errorf("name must be valid UTF-8")
	}
	_, err := c.mapping()
	return err
}

// template parses the upstream URL and header values.
func (c *FeedConfig) template() (*target.Template, error) {
	return target.Parse(c.Poll+c.Tail, c.Header)
}

// kind tells how the configured source's values become events.
func (c *FeedConfig) kind() feedKind {
	switch {
	case c.Tail != "":
		return tailFeed
	case c.Items != "":
		return itemFeed
	default:
		return documentFeed
	}
}

// mapping parses the pointers into a mapping.
func (c *FeedConfig) mapping() (mapping, error) {
	m := mapping{fixedType: c.Event, newestFirst: c.Order == "newest_first"}
	for _, p := range []struct {
		option string
		value  string
		dst    *pointer.Pointer
	}{{"items", c.Items, &m.items}, {"id", c.ID, &m.id}, {"type", c.Type, &m.typ}, {"data", c.Data, &m.data}} {
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

// limits returns the bounds of the replay log.
func (c *FeedConfig) limits() replay.Limits {
	return replay.Limits{Count: c.Replay, Bytes: c.ReplayBytes, MaxAge: time.Duration(c.ReplayMaxAge)}
}

// newSource returns the reader of the upstream that bound says, reporting
// to observer, each request taking a slot of limit if it is not nil.
func (c *FeedConfig) newSource(bound *target.Bound, limit chan struct{}, observer source.Observer, logger *zap.Logger) reader {
	cfg := source.Config{
		Target:      bound,
		Redacted:    bound.Redacted(),
		Limit:       limit,
		Timeout:     time.Duration(c.Timeout),
		ReadTimeout: time.Duration(c.ReadTimeout),
		MaxBody:     c.MaxBody,
		Backoff:     source.Backoff{Initial: time.Second, Max: time.Minute},
		Logger:      logger,
		Observer:    observer,
	}
	if c.kind() == tailFeed {
		return &source.Tail{Config: cfg}
	}
	interval := time.Duration(c.Interval)
	cfg.Backoff = source.Backoff{Initial: interval, Max: max(time.Minute, interval)}
	return &source.Poll{Config: cfg, Interval: interval, Spread: limit != nil}
}

// newFeed builds a feed of the config in one step: its metrics, its source
// of the upstream that bound says (nil: the config's own, without request
// placeholders), its log, shared through backend if not nil and identified
// there by clusterID, then the feed itself.
func (c *FeedConfig) newFeed(logger *zap.Logger, backend cluster.Backend, clusterID string, bound *target.Bound, limit chan struct{}) (*feed, error) {
	m, err := c.mapping()
	if err != nil {
		return nil, err
	}
	if bound == nil {
		tmpl, err := c.template()
		if err != nil {
			return nil, err
		}
		if bound, err = tmpl.Bind(nil); err != nil {
			return nil, err
		}
	}
	metrics, err := newFeedMetrics(c.Name)
	if err != nil {
		return nil, err
	}
	logger = logger.With(zap.String("feed", c.Name))
	log := replay.New(c.limits())
	var shared *sharing
	if backend != nil {
		shared = newSharing(backend, clusterID, c.limits(), metrics, logger)
	}
	return newFeed(feedParts{
		kind:      c.kind(),
		source:    c.newSource(bound, limit, metrics, logger),
		mapping:   m,
		log:       log,
		linger:    time.Duration(c.Linger),
		readyWait: time.Duration(c.Timeout),
		metrics:   metrics,
		logger:    logger,
		shared:    shared,
	}), nil
}
