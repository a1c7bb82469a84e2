package ssefeed

import (
	"errors"
	"fmt"
	"strconv"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// The module's collectors. They are package-level because Caddy gives every
// config its own registry; each registry gets the same collectors, so counts
// survive reloads.
var (
	metricSubscribers = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "sse_feed", Name: "subscribers",
		Help: "Subscribers connected to the feed.",
	}, []string{"feed"})
	metricEvents = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_feed", Name: "events_published_total",
		Help: "Events published by the feed.",
	}, []string{"feed"})
	metricBytes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_feed", Name: "bytes_written_total",
		Help: "Bytes written to the feed's subscribers.",
	}, []string{"feed"})
	metricUpstreamRequests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_feed", Name: "upstream_requests_total",
		Help: "Requests to the feed's upstream, by result: ok, not_modified or error.",
	}, []string{"feed", "result"})
	metricUpstreamErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_feed", Name: "upstream_errors_total",
		Help: "Upstream faults by reason: connect, status, read, invalid_json, too_large or mapping.",
	}, []string{"feed", "reason"})
	metricResumptions = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_feed", Name: "resumptions_total",
		Help: "Subscribers that came with a last event id, by result: hit or reset.",
	}, []string{"feed", "result"})
	metricSlowDisconnects = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_feed", Name: "slow_disconnects_total",
		Help: "Subscribers disconnected because they fell behind the replay log or stopped reading.",
	}, []string{"feed"})
	metricFeeds = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "sse_feed", Name: "feeds",
		Help: "Live per-request feeds of the handler.",
	}, []string{"feed"})
	metricFeedsStarted = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_feed", Name: "feeds_started_total",
		Help: "Per-request feeds started.",
	}, []string{"feed"})
	metricFeedsDropped = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_feed", Name: "feeds_dropped_total",
		Help: "Per-request feeds forgotten after their linger with no subscribers.",
	}, []string{"feed"})
	metricFeedsOverCapacity = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_feed", Name: "feeds_refused_total",
		Help: "Subscribers turned away because the handler had max_feeds per-request feeds.",
	}, []string{"feed"})
	metricUpstreamRefusals = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_feed", Name: "upstream_refusals_total",
		Help: "Per-request feeds the upstream refused, ending their subscribers, by status: 401, 403, 404 or 410.",
	}, []string{"feed", "status"})
	metricLeaseHeld = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "sse_feed", Name: "cluster_lease_held",
		Help: "Feeds whose cluster lease this instance holds, so that it reads their upstream.",
	}, []string{"feed"})
	metricLeaseChanges = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_feed", Name: "cluster_lease_changes_total",
		Help: "Times this instance took or lost a feed's cluster lease.",
	}, []string{"feed"})
	metricClusterErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_feed", Name: "cluster_errors_total",
		Help: "Failed operations on the cluster's store, by operation: acquire, renew, release, append or read.",
	}, []string{"feed", "op"})
)

// collectors are the module's collectors, each with a feed label.
var collectors = []interface {
	prometheus.Collector
	DeletePartialMatch(prometheus.Labels) int
}{
	metricSubscribers, metricEvents, metricBytes, metricUpstreamRequests,
	metricUpstreamErrors, metricResumptions, metricSlowDisconnects,
	metricFeeds, metricFeedsStarted, metricFeedsDropped, metricFeedsOverCapacity, metricUpstreamRefusals,
	metricLeaseHeld, metricLeaseChanges, metricClusterErrors,
}

// registerMetrics registers the collectors with a config's registry.
func registerMetrics(registry prometheus.Registerer) error {
	for _, c := range collectors {
		if err := registry.Register(c); err != nil {
			var already prometheus.AlreadyRegisteredError
			if !errors.As(err, &already) {
				return err
			}
		}
	}
	return nil
}

// feedMetrics holds one feed's collectors with the feed label applied, so
// that the hot path does no label lookups.
type feedMetrics struct {
	name           string
	subscribers    prometheus.Gauge
	events         prometheus.Counter
	bytes          prometheus.Counter
	resumeHit      prometheus.Counter
	resumeReset    prometheus.Counter
	slowDisconnect prometheus.Counter
}

// feedNames counts the live feeds of each name, so that a name's series
// are deleted when its last feed is.
var feedNames = struct {
	sync.Mutex
	live map[string]int
}{live: make(map[string]int)}

// newFeedMetrics returns the collectors of a feed named name. It fails for
// a name that cannot be a label value.
func newFeedMetrics(name string) (*feedMetrics, error) {
	m := &feedMetrics{name: name}
	for _, c := range []struct {
		dst    *prometheus.Counter
		vec    *prometheus.CounterVec
		labels []string
	}{
		{&m.events, metricEvents, []string{name}},
		{&m.bytes, metricBytes, []string{name}},
		{&m.resumeHit, metricResumptions, []string{name, "hit"}},
		{&m.resumeReset, metricResumptions, []string{name, "reset"}},
		{&m.slowDisconnect, metricSlowDisconnects, []string{name}},
	} {
		counter, err := c.vec.GetMetricWithLabelValues(c.labels...)
		if err != nil {
			return nil, fmt.Errorf("feed name %q: %v", name, err)
		}
		*c.dst = counter
	}
	gauge, err := metricSubscribers.GetMetricWithLabelValues(name)
	if err != nil {
		return nil, fmt.Errorf("feed name %q: %v", name, err)
	}
	m.subscribers = gauge
	feedNames.Lock()
	feedNames.live[name]++
	feedNames.Unlock()
	return m, nil
}

// release deletes the feed's series when no other live feed has its name.
func (m *feedMetrics) release() {
	feedNames.Lock()
	defer feedNames.Unlock()
	feedNames.live[m.name]--
	if feedNames.live[m.name] > 0 {
		return
	}
	delete(feedNames.live, m.name)
	for _, c := range collectors {
		c.DeletePartialMatch(prometheus.Labels{"feed": m.name})
	}
}

// UpstreamRequest implements source.Observer.
func (m *feedMetrics) UpstreamRequest(result string) {
	metricUpstreamRequests.WithLabelValues(m.name, result).Inc()
}

// UpstreamError implements source.Observer.
func (m *feedMetrics) UpstreamError(reason string) {
	metricUpstreamErrors.WithLabelValues(m.name, reason).Inc()
}

// StoreError implements cluster.Observer.
func (m *feedMetrics) StoreError(op string) {
	metricClusterErrors.WithLabelValues(m.name, op).Inc()
}

// LeaseChange implements cluster.Observer.
func (m *feedMetrics) LeaseChange(held bool) {
	metricLeaseChanges.WithLabelValues(m.name).Inc()
	if held {
		metricLeaseHeld.WithLabelValues(m.name).Inc()
	} else {
		metricLeaseHeld.WithLabelValues(m.name).Dec()
	}
}

// refused counts an upstream's refusal of a per-request feed.
func (m *feedMetrics) refused(status int) {
	metricUpstreamRefusals.WithLabelValues(m.name, strconv.Itoa(status)).Inc()
}
