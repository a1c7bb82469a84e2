package ssefeed

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/ssefeed/caddy-ssefeed/cluster"
	"github.com/ssefeed/caddy-ssefeed/target"
)

// errOverCapacity turns a subscriber away with the over-capacity answer: a
// feed's max_subscribers or a handler's max_feeds was reached.
var errOverCapacity = errors.New("over capacity")

// identityKey keys the hashes that identify per-request feeds in this
// process, so that neither a request's values nor their plain hash are
// kept in memory.
var identityKey = func() []byte {
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	return key
}()

// feedSet holds the live per-request feeds of a handler config: one per
// distinct binding of its template. It is kept across reloads like a
// static feed, so that an unchanged handler keeps its feeds and streams.
type feedSet struct {
	config   FeedConfig
	template *target.Template
	backend  cluster.Backend
	key      string // the config's canonical form
	logger   *zap.Logger
	// limit holds a slot per upstream request in flight, for all feeds.
	limit chan struct{}
	// metrics is the handler's, held while the set lives.
	metrics *feedMetrics

	mu     sync.Mutex
	live   map[string]*feed
	closed bool
}

func newFeedSet(c FeedConfig, tmpl *target.Template, backend cluster.Backend, key string, logger *zap.Logger) (*feedSet, error) {
	metrics, err := newFeedMetrics(c.Name)
	if err != nil {
		return nil, err
	}
	return &feedSet{
		config: c, template: tmpl, backend: backend, key: key, logger: logger,
		limit:   make(chan struct{}, c.MaxConcurrentRequests),
		metrics: metrics,
		live:    make(map[string]*feed),
	}, nil
}

// subscribe admits a subscriber of r to the feed of r's binding of the
// template, starting that feed if it is not live. It fails with a 400
// handler error for a request value that cannot be used, and with
// errOverCapacity at max_feeds or at the feed's limit of subscribers.
func (s *feedSet) subscribe(r *http.Request, maxSubscribers int) (*feed, admission, error) {
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	bound, err := s.template.Bind(repl)
	if err != nil {
		return nil, admission{}, caddyhttp.Error(http.StatusBadRequest, err)
	}
	mac := hmac.New(sha256.New, identityKey)
	mac.Write(bound.Identity())
	id := string(mac.Sum(nil))

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, admission{}, errOverCapacity
	}
	f := s.live[id]
	if f == nil {
		if len(s.live) >= s.config.MaxFeeds {
			metricFeedsOverCapacity.WithLabelValues(s.config.Name).Inc()
			return nil, admission{}, errOverCapacity
		}
		if f, err = s.newFeed(id, bound); err != nil {
			return nil, admission{}, err
		}
		s.live[id] = f
		metricFeeds.WithLabelValues(s.config.Name).Inc()
		metricFeedsStarted.WithLabelValues(s.config.Name).Inc()
	}
	a, ok := f.subscribe(maxSubscribers)
	if !ok {
		return nil, admission{}, errOverCapacity
	}
	return f, a, nil
}

// newFeed builds the feed of one binding. In a cluster, the feed's id
// must be the same on every instance: it is a hash of the config and the
// binding, not keyed with this process's key.
func (s *feedSet) newFeed(id string, bound *target.Bound) (*feed, error) {
	clusterID := ""
	if s.backend != nil {
		sum := sha256.Sum256(append([]byte(s.key+"\x00"), bound.Identity()...))
		clusterID = fmt.Sprintf("%x", sum)
	}
	f, err := s.config.newFeed(s.logger, s.backend, clusterID, bound, s.limit)
	if err != nil {
		return nil, err
	}
	f.decides = true
	f.idle = func(f *feed) { s.forget(id, f) }
	return f, nil
}

// forget drops f if it is still idle: its reader stopped after the linger
// with no subscriber since, or the upstream refused it. Its log and
// goroutines go with it; a later Last-Event-ID for it gets the reset.
func (s *feedSet) forget(id string, f *feed) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f.mu.Lock()
	refused := f.closed
	idle := refused || f.subscribers == 0 && f.stopReader == nil
	f.mu.Unlock()
	if !idle || s.live[id] != f {
		return
	}
	delete(s.live, id)
	metricFeeds.WithLabelValues(s.config.Name).Dec()
	if !refused {
		metricFeedsDropped.WithLabelValues(s.config.Name).Inc()
	}
	_ = f.Destruct()
}

// Destruct ends every feed of the set. The usage pool calls it when the
// last config using the set is cleaned up.
func (s *feedSet) Destruct() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	for id, f := range s.live {
		_ = f.Destruct()
		delete(s.live, id)
		metricFeeds.WithLabelValues(s.config.Name).Dec()
	}
	s.metrics.release()
	return nil
}

// Interface guards.
var _ caddy.Destructor = (*feedSet)(nil)
