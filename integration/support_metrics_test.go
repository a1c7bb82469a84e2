package integration

import (
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Series are written as in the exposition format, such as
// `caddy_sse_feed_subscribers{feed="slow"}`.

// scrapeMetrics returns the text of the admin endpoint's /metrics.
func scrapeMetrics(t require.TestingT) string {
	return scrapeMetricsOf(t, adminURL)
}

// scrapeMetricsOf returns the text of /metrics of the admin endpoint at
// admin, a URL.
func scrapeMetricsOf(t require.TestingT, admin string) string {
	resp, err := http.Get(admin + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode, "GET /metrics")
	return string(body)
}

// metricValue finds the value of one series in exposition text.
func metricValue(text, series string) (float64, bool) {
	for line := range strings.Lines(text) {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			return v, err == nil
		}
	}
	return 0, false
}

// metric scrapes the value of one series, 0 when there is none.
func metric(t require.TestingT, series string) float64 {
	v, _ := metricValue(scrapeMetrics(t), series)
	return v
}

// expectMetrics waits until every series has its value in want, since some
// are counted after the event that the test sees.
func expectMetrics(t *testing.T, within time.Duration, want map[string]float64) {
	t.Helper()
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		text := scrapeMetrics(c)
		got := make(map[string]float64, len(want))
		for series := range want {
			if v, ok := metricValue(text, series); ok {
				got[series] = v
			}
		}
		assert.Equal(c, want, got, "scraped:\n%s", grepLines(text, "caddy_sse_feed_"))
	}, within, 50*time.Millisecond)
}

// grepLines returns the lines of text that start with prefix.
func grepLines(text, prefix string) string {
	var b strings.Builder
	for line := range strings.Lines(text) {
		if strings.HasPrefix(line, prefix) {
			b.WriteString(line)
		}
	}
	return b.String()
}
