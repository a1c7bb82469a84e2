package ssefeed

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/internal/clustertest"
	"github.com/ssefeed/caddy-ssefeed/replay"
)

// startPacer paces a new log with interval until the test ends.
func startPacer(t *testing.T, interval time.Duration) (*pacer, *replay.Log) {
	t.Helper()
	clustertest.CheckGoroutines(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	log := replay.New(replay.Limits{})
	return newPacer(ctx, log, interval), log
}

// appendFrame appends one frame to log.
func appendFrame(log *replay.Log) {
	log.Append(replay.Frame{Bytes: []byte("data: x\n\n")})
}

// awaitRelease fails the test if wake is not closed within a few seconds.
func awaitRelease(t *testing.T, wake <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-wake:
	case <-time.After(5 * time.Second):
		t.Fatalf("no release %s", what)
	}
}

func TestPacerReleasesTheFirstAppendAtOnce(t *testing.T) {
	p, log := startPacer(t, time.Hour)
	wake := p.next()
	require.False(t, isDone(wake), "released before any append")
	appendFrame(log)
	awaitRelease(t, wake, "after the first append")

	// Within the hour that follows, appends wait.
	wake = p.next()
	appendFrame(log)
	appendFrame(log)
	time.Sleep(50 * time.Millisecond)
	require.False(t, isDone(wake), "released again within the interval")
}

func TestPacerReleasesWhatArrivedDuringThePauseAfterIt(t *testing.T) {
	const interval = 200 * time.Millisecond
	p, log := startPacer(t, interval)
	start := time.Now()
	wake := p.next()
	appendFrame(log)
	awaitRelease(t, wake, "after the first append")
	wake = p.next()
	appendFrame(log)
	awaitRelease(t, wake, "after the pause")
	require.GreaterOrEqual(t, time.Since(start), interval, "released before the interval had passed")
}

func TestPacerReleasesADrop(t *testing.T) {
	p, log := startPacer(t, time.Millisecond)
	appendFrame(log)
	time.Sleep(10 * time.Millisecond) // past the pause of that append
	wake := p.next()
	log.Drop()
	awaitRelease(t, wake, "after a drop")
}

func TestFeedSharesOnePacerPerIntervalAndEndsThem(t *testing.T) {
	clustertest.CheckGoroutines(t) // after the feed's end
	f := newTestFeed(t, tailFeed, FeedConfig{}, replay.Limits{})
	require.Same(t, f.pacer(time.Second), f.pacer(time.Second))
	require.NotSame(t, f.pacer(time.Second), f.pacer(2*time.Second))
}

func TestTheEndOfAFeedsContextClosesEveryWaitAfterTheLog(t *testing.T) {
	f := newTestFeed(t, documentFeed, FeedConfig{}, replay.Limits{})
	paced := f.pacer(time.Hour)
	waits := map[string]<-chan struct{}{"log": f.log.Wake(), "ready": f.ready, "pacer": paced.next()}
	f.cancel() // as an exit does: the feed's context ends, without end
	for name, wait := range waits {
		awaitRelease(t, wait, "of "+name)
		_, _, _, _, err := f.log.Read(f.log.Next(), nil, 1, 1)
		require.ErrorIs(t, err, replay.ErrClosed, "%s closed before the log", name)
	}
	require.True(t, isDone(paced.next()), "a stream that waits after the end would wait for ever")
}
