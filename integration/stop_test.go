package integration

import (
	"fmt"
	"os/exec"
	"testing"
	"time"

	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

// The processes under test have ports of their own, so that they never meet
// the in-process Caddy of caddytest, nor each other.

// TestStopEndsStreamsAndExits runs the real binary with Caddy's default
// eternal grace period, opens a stream and runs `caddy stop`: the process
// must exit promptly, ending the stream, instead of waiting for the client.
func TestStopEndsStreamsAndExits(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the caddy binary")
	}
	const admin, site = "localhost:2998", "http://localhost:9081"
	up := newNDJSONUpstream(t)
	caddy := runCaddy(t, fmt.Sprintf(`{
	admin %s
	http_port 9081
	https_port 9444
	persist_config off
	skip_install_trust
}
%s {
	sse_feed /events {
		tail %s
		id /id
		data /body
	}
}
`, admin, site, up.URL), site+"/")

	s := ssetest.Open(t, site+"/events")
	up.WaitConnected(t, 1)
	sendAndExpect(t, up, []string{"before-stop"}, s)

	// `caddy stop` returns when the process has stopped, so it runs in
	// the background while the test waits for the exit.
	startProcess(t, caddyBinary(t), "stop", "--address", admin)
	caddy.expectExit(t, 5*time.Second, "held by an open stream")
	s.ExpectEnd(t, time.Second)
}

// TestStopEndsThousandStreamsAndExits runs the real binary, with Caddy's
// default eternal grace period, on ports of its own, opens a thousand
// streams and runs `caddy stop`: the process must exit within seconds.
func TestStopEndsThousandStreamsAndExits(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the caddy binary")
	}
	raiseFileLimit(t, 3*manyStreams)
	up := newNumberedUpstream(t, 50*time.Millisecond, 64)
	caddy := runCaddy(t, fmt.Sprintf(`{
	admin localhost:2996
	http_port 9082
	https_port 9445
	persist_config off
	skip_install_trust
}
http://localhost:9082 {
	sse_feed /events {
		tail %s
		id /id
	}
}
`, up.feedURL()), "http://localhost:9082/")
	streams := openLiveStreams(t, newStreamClient(t), "http://localhost:9082/events", manyStreams)
	waitAllPast(t, streams, up.Produced(), 10*time.Second)

	start := time.Now()
	if out, err := exec.Command(caddyBinary(t), "stop", "--address", "localhost:2996").CombinedOutput(); err != nil {
		t.Fatalf("caddy stop: %v\n%s", err, out)
	}
	caddy.expectExit(t, 5*time.Second, fmt.Sprintf("with %d open streams", manyStreams))
	exit := time.Since(start)
	waitAllEnded(t, streams, time.Second)
	t.Logf("caddy stop with %d open streams: the process exited %v after the stop command started", manyStreams, exit.Round(time.Millisecond))
}
