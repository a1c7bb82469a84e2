package integration

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestReloadKeepsAnUnchangedFeed(t *testing.T) {
	up := newNDJSONUpstream(t)
	feed := "sse_feed /events {\n\ttail " + up.URL + "\n\t%s\n}"
	caddy := startCaddy(t, fmt.Sprintf(feed, "heartbeat 10s"))
	s := openStream(t, "/events")
	up.WaitConnected(t, 1)
	up.Send(`{"n":1}` + "\n")
	before := s.NextEvent(t)

	// Another route and another heartbeat leave the feed as it is.
	caddy.reload(fmt.Sprintf(feed, "heartbeat 20s") + "\nrespond /other \"other\"")
	up.Send(`{"n":2}` + "\n")
	after := s.NextEvent(t)
	prefix, n, _ := strings.Cut(before.LastEventID, "-")
	if after.Data != `{"n":2}` || after.LastEventID != prefix+"-"+strconv.Itoa(mustAtoi(t, n)+1) {
		t.Fatalf("after the reload got %+v, want the id after %q", after, before.LastEventID)
	}
	require.Len(t, up.Requests(), 1, "upstream requests")

	// A changed feed ends the old streams so that clients reconnect.
	caddy.reload(fmt.Sprintf(feed, "id /n"))
	s.ExpectEnd(t, 3*time.Second)
}

func TestUnloadEndsStreams(t *testing.T) {
	up := newNDJSONUpstream(t)
	caddy := startCaddy(t, tailFeed(up.URL, "heartbeat off"))
	s := openStream(t, "/events")
	up.WaitConnected(t, 1)
	sendAndExpect(t, up, []string{"u1"}, s)
	caddy.reload(`respond "no feed here"`)
	s.ExpectEnd(t, 3*time.Second)
	up.WaitConnected(t, 0)
}

func TestReloadUnderLoad(t *testing.T) {
	raiseFileLimit(t, 3*manyStreams)
	up := newNumberedUpstream(t, 50*time.Millisecond, 64)
	caddy := startCaddy(t, leakSite(up, ""))
	client := newStreamClient(t)
	streams := openLiveStreams(t, client, siteURL+"/events", manyStreams)
	waitAllPast(t, streams, up.Produced(), 10*time.Second)

	// Unchanged feed, changed config: every stream goes on.
	start := time.Now()
	caddy.reload(leakSite(up, `respond /other "reloaded"`))
	unchanged := time.Since(start)
	waitAllPast(t, streams, up.Produced(), 10*time.Second)
	up.WaitOpen(t, 1, time.Second)

	// A config without the feed: every stream ends, and so does the reader.
	start = time.Now()
	caddy.reload(`respond /events "gone"`)
	dropped := time.Since(start)
	ended := waitAllEnded(t, streams, 5*time.Second)
	up.WaitOpen(t, 0, 5*time.Second)
	t.Logf("%d streams: reload with the feed unchanged took %v and kept them all; reload without the feed took %v, and all ended %v after it returned",
		manyStreams, unchanged.Round(time.Millisecond), dropped.Round(time.Millisecond), ended.Round(time.Millisecond))
}
