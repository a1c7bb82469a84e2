package ssefeed

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"
)

// seriesOf counts the module's series labelled with the feed name.
func seriesOf(t *testing.T, name string) int {
	t.Helper()
	n := 0
	for _, c := range collectors {
		ch := make(chan prometheus.Metric, 64)
		go func() { c.Collect(ch); close(ch) }()
		for m := range ch {
			var out dto.Metric
			require.NoError(t, m.Write(&out))
			for _, label := range out.GetLabel() {
				if label.GetName() == "feed" && label.GetValue() == name {
					n++
				}
			}
		}
	}
	return n
}

func TestFeedMetricsAreDeletedWithTheirLastFeed(t *testing.T) {
	name := t.Name()
	first, err := newFeedMetrics(name)
	require.NoError(t, err)
	second, err := newFeedMetrics(name)
	require.NoError(t, err)
	first.UpstreamRequest("ok")
	first.UpstreamError("connect")
	require.Equal(t, 8, seriesOf(t, name))

	first.release()
	require.Equal(t, 8, seriesOf(t, name), "series deleted while a feed of that name lives")
	second.release()
	require.Zero(t, seriesOf(t, name))
}

func TestFeedMetricsRefuseANameThatIsNoLabel(t *testing.T) {
	_, err := newFeedMetrics("caf\xe9")
	require.ErrorContains(t, err, "feed name")
}
