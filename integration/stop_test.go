package integration

import (
	"fmt"
	"net/http"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

// The processes under test have ports of their own, free ones, so that they
// never meet the in-process Caddy of caddytest, nor each other.

// TestStopEndsStreamsAndExits runs the real binary with Caddy's default
// eternal grace period, opens a stream and runs `caddy stop`: the process
// must exit promptly, ending the stream, instead of waiting for the client.
func TestStopEndsStreamsAndExits(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the caddy binary")
	}
	up := newNDJSONUpstream(t)
	caddy := startBinary(t, tailFeed(up.URL))
	s := ssetest.Open(t, caddy.URL+"/events")
	up.WaitConnected(t, 1)
	sendAndExpect(t, up, []string{"before-stop"}, s)

	caddy.stop(t)
	caddy.expectExit(t, 5*time.Second, "held by an open stream")
	s.ExpectEnd(t, time.Second)
}

// TestStopEndsThousandStreamsAndExits runs the real binary, with Caddy's
// default eternal grace period, opens a thousand streams and runs `caddy
// stop`: the process must exit within seconds.
func TestStopEndsThousandStreamsAndExits(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the caddy binary")
	}
	raiseFileLimit(t, 3*manyStreams)
	up := newNumberedUpstream(t, 50*time.Millisecond, 64)
	caddy := startBinary(t, "sse_feed /events {\n\ttail "+up.feedURL()+"\n\tid /id\n}")
	streams := openLiveStreams(t, newStreamClient(t), caddy.URL+"/events", manyStreams)
	waitAllPast(t, streams, up.Produced(), 10*time.Second)

	start := time.Now()
	caddy.stop(t)
	caddy.expectExit(t, 5*time.Second, fmt.Sprintf("with %d open streams", manyStreams))
	exit := time.Since(start)
	waitAllEnded(t, streams, time.Second)
	t.Logf("caddy stop with %d open streams: the process exited %v after the stop command started", manyStreams, exit.Round(time.Millisecond))
}

// TestExitAfterReloadEndsStreams runs the real binary with Caddy's default
// eternal grace period, opens a stream, reloads a changed Caddyfile that
// keeps the feed, and then signals the process: it must exit promptly and
// end the stream, although the stream was opened under the config before
// the reload, whose handlers Caddy does not tell of the exit.
func TestExitAfterReloadEndsStreams(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the caddy binary")
	}
	for name, sig := range map[string]os.Signal{"SIGTERM": syscall.SIGTERM, "SIGINT": syscall.SIGINT} {
		t.Run(name, func(t *testing.T) {
			up := newNDJSONUpstream(t)
			feed := tailFeed(up.URL)
			caddy := startBinary(t, feed)
			s := ssetest.Open(t, caddy.URL+"/events")
			up.WaitConnected(t, 1)
			sendAndExpect(t, up, []string{"before-reload"}, s)

			caddy.reload(t, feed+"\nrespond /other \"reloaded\"")
			resp, err := http.Get(caddy.URL + "/other")
			require.NoError(t, err)
			resp.Body.Close()
			require.Equal(t, http.StatusOK, resp.StatusCode, "the reloaded config's route")
			sendAndExpect(t, up, []string{"after-reload"}, s)

			start := time.Now()
			caddy.signal(t, sig)
			caddy.expectExit(t, 5*time.Second, "held by a stream opened before a reload")
			s.ExpectEnd(t, time.Second)
			t.Logf("%s: exited %v after the signal", name, time.Since(start).Round(time.Millisecond))
		})
	}
}

// TestStopWithStalledClientsExitsAtOnce runs the real binary on a feed of
// large events, published fast, with five clients that stopped reading and
// one that reads: `caddy stop` must end every stream at once. A stream
// blocked in a write on a client that reads nothing must not hold the exit
// until its write times out.
func TestStopWithStalledClientsExitsAtOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the caddy binary")
	}
	const stalled = 5
	up := newNumberedUpstream(t, 5*time.Millisecond, 32<<10)
	caddy := startBinary(t, `sse_feed /events {
	tail `+up.feedURL()+`
	id /id
	name stop
}`)
	reader := ssetest.Open(t, caddy.URL+"/events")
	reader.NextEvent(t)
	for range stalled {
		// An unknown id is owed every retained event at once.
		stalledClientOf(t, caddy.URL+"/events", "Last-Event-ID", "unknown")
	}
	admin := "http://" + caddy.admin
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		v, _ := metricValue(scrapeMetricsOf(c, admin), `caddy_sse_feed_subscribers{feed="stop"}`)
		assert.Equal(c, float64(stalled+1), v, "subscribers")
	}, 5*time.Second, 50*time.Millisecond)
	// A second of events at 6 MB/s fills the stalled clients' socket
	// buffers, so that their streams block in a write.
	time.Sleep(time.Second)
	reader.NextEvent(t)

	start := time.Now()
	caddy.stop(t)
	caddy.expectExit(t, 3*time.Second, fmt.Sprintf("with %d clients that stopped reading", stalled))
	exit := time.Since(start)
	reader.ExpectEnd(t, time.Second)
	t.Logf("caddy stop with %d stalled clients and one reader: the process exited %v after the stop command started",
		stalled, exit.Round(time.Millisecond))
}

// TestSignalWithHTTP2StreamsExitsCleanly runs the real binary with many
// h2c streams open and signals it: it must exit cleanly. Cutting a stream's
// blocked write at exit once ran after the stream's handler had returned,
// and x/net/http2 panics on a response used after that.
func TestSignalWithHTTP2StreamsExitsCleanly(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the caddy binary")
	}
	up := newNDJSONUpstream(t)
	caddy := startBinary(t, tailFeed(up.URL), "servers {\n\tprotocols h1 h2c\n}")
	protocols := new(http.Protocols)
	protocols.SetUnencryptedHTTP2(true)
	transport := &http.Transport{Protocols: protocols}
	t.Cleanup(transport.CloseIdleConnections)
	client := &http.Client{Transport: transport}
	streams := make([]*ssetest.Stream, 200)
	for i := range streams {
		streams[i] = ssetest.OpenWith(t, client, nil, caddy.URL+"/events")
	}
	up.WaitConnected(t, 1)
	sendAndExpect(t, up, []string{"before-signal"}, streams...)

	caddy.signal(t, syscall.SIGINT)
	caddy.expectExit(t, 5*time.Second, "with h2c streams open")
}
