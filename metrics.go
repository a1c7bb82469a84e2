package ssefeed

import (
	"errors"

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
		Help: "Subscribers disconnected because they fell behind the replay log.",
	}, []string{"feed"})
)

var collectors = []prometheus.Collector{
	metricSubscribers, metricEvents, metricBytes, metricUpstreamRequests,
	metricUpstreamErrors, metricResumptions, metricSlowDisconnects,
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

func newFeedMetrics(name string) *feedMetrics {
	return &feedMetrics{
		name:           name,
		subscribers:    metricSubscribers.WithLabelValues(name),
		events:         metricEvents.WithLabelValues(name),
		bytes:          metricBytes.WithLabelValues(name),
		resumeHit:      metricResumptions.WithLabelValues(name, "hit"),
		resumeReset:    metricResumptions.WithLabelValues(name, "reset"),
		slowDisconnect: metricSlowDisconnects.WithLabelValues(name),
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
