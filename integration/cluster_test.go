package integration

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ssefeed/caddy-ssefeed/internal/clustertest"
	"github.com/ssefeed/caddy-ssefeed/internal/ssetest"
)

// These tests run three real Caddy processes with one real Redis, as issue
// 12 and SPEC.md's "Cluster" say a site outgrowing one Caddy does.

// TestClusterOneUpstreamReader has subscribers of a poll feed and of a tail
// feed on three nodes: the upstream sees one poll per interval in all, and
// one NDJSON connection; every node serves the same events with the same
// ids, and the metrics name the one node that reads.
func TestClusterOneUpstreamReader(t *testing.T) {
	r := startClusterRedis(t)
	const interval = 200 * time.Millisecond
	// Each poll answers a new document, so each poll is one event: a
	// second reader would show as a gap on every stream.
	var polls atomic.Int64
	poll := newWitness(t, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"n":%d}`, polls.Add(1))
	}), nil)
	_, tail, tailURL := tailedUpstream(t, 50*time.Millisecond)
	cluster := clusterOption(r, 2*time.Second)
	site := feedBlock("/poll", "poll "+poll.URL+"/doc "+interval.String(), "name cluster_poll", instanceHeader, cluster) +
		feedBlock("/tail", "tail "+tailURL, "id /id", "name cluster_tail", instanceHeader, cluster)
	nodes := startNodes(t, site, "a", "b", "c")

	pollStreams := make([]*ssetest.Stream, len(nodes))
	tailStreams := make([]*ssetest.Stream, len(nodes))
	for i, n := range nodes {
		pollStreams[i] = ssetest.Open(t, n.url+"/poll")
		tailStreams[i] = ssetest.Open(t, n.url+"/tail")
	}

	// Every stream's first document, then every poll's document until 15
	// more polls: counted as requests, and as events on every stream.
	firsts := make([]int, len(nodes))
	for i, s := range pollStreams {
		firsts[i] = pollNumber(t, s.NextEvent(t))
	}
	const window = 15
	start, startPolls := time.Now(), polls.Load()
	last := max(firsts[0], firsts[1], firsts[2]) + window
	ids := make([]map[int]string, len(nodes)) // document number -> event id, per stream
	for i, s := range pollStreams {
		ids[i] = make(map[int]string)
		for n := firsts[i]; n < last; {
			ev := s.NextEvent(t)
			got := pollNumber(t, ev)
			require.Equal(t, n+1, got, "node %s: document after %d", nodes[i].name, n)
			n = got
			ids[i][n] = ev.LastEventID
		}
	}
	elapsed, requests := time.Since(start), polls.Load()-startPolls
	for n := max(firsts[0], firsts[1], firsts[2]) + 1; n <= last; n++ {
		require.Equal(t, ids[0][n], ids[1][n], "ids of document %d on nodes a and b", n)
		require.Equal(t, ids[0][n], ids[2][n], "ids of document %d on nodes a and c", n)
	}
	perInterval := float64(requests) / (float64(elapsed) / float64(interval))
	t.Logf("poll: %d upstream requests in %v with 3 nodes: %.2f per %v interval", requests, elapsed.Round(time.Millisecond), perInterval, interval)
	// One reader polls at most once per interval; three would poll thrice.
	require.LessOrEqual(t, requests, int64(elapsed/interval)+2, "upstream polls in %v", elapsed)
	pollers := instancesOf(poll.Requests())
	require.Len(t, pollers, 1, "nodes that polled the upstream")

	for i, s := range tailStreams {
		first := numericID(t, s.NextEvent(t))
		ids := []string{}
		for id := first + 1; id <= first+20; id++ {
			ids = append(ids, strconv.Itoa(id))
		}
		s.ExpectIDs(t, ids...)
		t.Logf("tail: node %s got ids %d to %d", nodes[i].name, first, first+20)
	}
	require.Equal(t, 1, tail.MaxOpen(), "NDJSON connections open at once")
	tailers := instancesOf(tail.Requests())
	require.Len(t, tailers, 1, "nodes that read the NDJSON upstream")
	t.Logf("tail: %d NDJSON requests in all, at most %d open at once", len(tail.Requests()), tail.MaxOpen())

	require.Equal(t, pollers[0], leaseHolder(t, nodes, "cluster_poll").name, "the node holding the poll feed's lease")
	require.Equal(t, tailers[0], leaseHolder(t, nodes, "cluster_tail").name, "the node holding the tail feed's lease")
}

// pollNumber returns the n of a {"n":<n>} document event.
func pollNumber(t *testing.T, ev ssetest.Event) int {
	t.Helper()
	var doc struct{ N int }
	require.NoError(t, json.Unmarshal([]byte(ev.Data), &doc), "data %q", ev.Data)
	return doc.N
}

// instancesOf returns the distinct nodes that sent requests, in order of
// their first.
func instancesOf(requests []witnessed) []string {
	var names []string
	seen := make(map[string]bool)
	for _, req := range requests {
		if !seen[req.instance] {
			seen[req.instance] = true
			names = append(names, req.instance)
		}
	}
	return names
}

// TestClusterResumeOnNodeWithoutFeed resumes a subscriber of node a on
// node b, where nobody has subscribed yet: b starts its feed for it, and
// the id, which the shared log has, resumes right after it, without a
// reset.
func TestClusterResumeOnNodeWithoutFeed(t *testing.T) {
	r := startClusterRedis(t)
	_, _, tailURL := tailedUpstream(t, 20*time.Millisecond)
	site := feedBlock("/events", "tail "+tailURL, "id /id", "name cluster_resume", clusterOption(r, 2*time.Second))
	nodes := startNodes(t, site, "a", "b")

	s := ssetest.Open(t, nodes[0].url+"/events")
	var last int
	for range 3 {
		last = numericID(t, s.NextEvent(t))
	}
	s.Close()
	resumed := ssetest.Open(t, nodes[1].url+"/events", "Last-Event-ID", strconv.Itoa(last))
	resumed.ExpectIDs(t, strconv.Itoa(last+1), strconv.Itoa(last+2))
}

// TestClusterRoamingSubscribersResume has 60 subscribers hang up at random
// and come back on a random node with their Last-Event-ID for 10s, through
// an upstream that emits an id every 20ms: none loses, repeats or reorders
// an event, and none gets a reset. They all start on one node, so the
// other two start their feed for a subscriber that brings an id.
func TestClusterRoamingSubscribersResume(t *testing.T) {
	r := startClusterRedis(t)
	up, _, tailURL := tailedUpstream(t, 20*time.Millisecond)
	// The replay log holds far more than the test produces: a reset is a
	// failure.
	site := feedBlock("/events", "tail "+tailURL, "id /id", "replay 5000", "name cluster_roam", clusterOption(r, 2*time.Second))
	nodes := startNodes(t, site, "a", "b", "c")

	g := startRoaming(t, nodes, nodes[0], "/events", 60, time.Second)
	start := up.Produced()
	time.Sleep(10 * time.Second) // the roaming, not a bound on anything
	g.Settle()
	g.WaitAllPast(t, up.Produced(), 20*time.Second)
	g.Check(t)
	t.Logf("the upstream produced ids %d to %d meanwhile", start, up.Produced())
}

// TestClusterFailover kills the lease holder with SIGKILL mid-stream, then
// stops the next one with SIGSTOP past its lease and lets it go on: each
// time another node reads the upstream within about the lease, resuming
// where the last append stopped, and subscribers roaming over the nodes
// that are up lose, repeat and reorder nothing. The stopped node, woken,
// gives up its term: it appends nothing, and its log is the others'.
func TestClusterFailover(t *testing.T) {
	r := startClusterRedis(t)
	const lease = time.Second
	up, upstream, tailURL := tailedUpstream(t, 20*time.Millisecond)
	site := feedBlock("/events", "tail "+tailURL, "id /id", "replay 5000", "name cluster_failover", instanceHeader, clusterOption(r, lease))
	nodes := startNodes(t, site, "a", "b", "c")
	byName := map[string]*node{}
	for _, n := range nodes {
		byName[n.name] = n
	}
	// except returns the nodes other than those given.
	except := func(gone ...*node) []*node {
		var up []*node
		for _, n := range nodes {
			if !slices.Contains(gone, n) {
				up = append(up, n)
			}
		}
		return up
	}

	g := startRoaming(t, nodes, nil, "/events", 30, 700*time.Millisecond)
	g.WaitAllPast(t, up.Produced()+10, 10*time.Second)

	// kill -9 of the holder: no release, the lease has to expire.
	holder := upstream.WaitOpen(t, 5*time.Second, "one", func(open []witnessed) bool { return len(open) == 1 })[0]
	killed := byName[holder.instance]
	require.Equal(t, killed, leaseHolder(t, nodes, "cluster_failover"), "the lease holder is the node reading the upstream")
	survivors := except(killed)
	g.SetUp(survivors...)
	killedAt := time.Now()
	killed.signal(t, syscall.SIGKILL)
	takeover := upstream.WaitOpen(t, 10*time.Second, "one from a survivor", func(open []witnessed) bool {
		return len(open) == 1 && open[0].instance != killed.name
	})[0]
	failover := takeover.start.Sub(killedAt)
	t.Logf("kill -9 of node %s: node %s read the upstream %v later (lease %v), from ?%s",
		killed.name, takeover.instance, failover.Round(time.Millisecond), lease, takeover.query)
	require.Less(t, failover, 2*lease+time.Second, "failover after kill -9")
	afterKill := up.Produced()
	g.WaitAllPast(t, afterKill, 10*time.Second)

	// kill -STOP of the new holder past its lease, then -CONT.
	stopped := byName[takeover.instance]
	third := except(killed, stopped)[0]
	g.SetUp(third)
	stoppedAt := time.Now()
	stopped.signal(t, syscall.SIGSTOP)
	// The stopped node cannot close its connection.
	second := upstream.WaitOpen(t, 10*time.Second, "the stopped node's and the third's", func(open []witnessed) bool {
		return len(open) == 2 && open[0].instance == stopped.name && open[1].instance == third.name
	})[1]
	takeover2 := second.start.Sub(stoppedAt)
	t.Logf("kill -STOP of node %s: node %s read the upstream %v later, from ?%s", stopped.name, third.name, takeover2.Round(time.Millisecond), second.query)
	require.Less(t, takeover2, 2*lease+time.Second, "failover after kill -STOP")
	g.WaitAllPast(t, up.Produced(), 10*time.Second)
	stopped.signal(t, syscall.SIGCONT)
	g.SetUp(stopped, third)
	// Woken, it finds its lease gone and stops reading.
	upstream.WaitOpen(t, 10*time.Second, "the third's only", func(open []witnessed) bool {
		return len(open) == 1 && open[0].instance == third.name
	})
	require.Equal(t, third, leaseHolder(t, survivors, "cluster_failover"), "the lease holder after -CONT")

	g.Settle()
	end := up.Produced()
	g.WaitAllPast(t, end, 20*time.Second)
	g.Check(t)

	// Each node that is up has every id since the kill once, in order.
	var want []string
	for id := afterKill + 1; id <= end; id++ {
		want = append(want, strconv.Itoa(id))
	}
	for _, n := range survivors {
		ssetest.Open(t, n.url+"/events", "Last-Event-ID", strconv.Itoa(afterKill)).ExpectIDs(t, want...)
	}

	log := stopped.stop(t)
	// Whether its reader or its lease loop runs first after -CONT is up to
	// the scheduler: the fence refuses the reader's append, or the lease
	// loop ends the term before.
	fenced := strings.Contains(log, "lease taken over; append refused")
	require.True(t, fenced || strings.Contains(log, "lease expired before it could be renewed") || strings.Contains(log, `"lease lost"`),
		"node %s's log after -CONT tells that it gave up its term:\n%s", stopped.name, lastLines(log, 30))
	t.Logf("node %s, woken past its lease, gave up its term; an append of its was refused by the fence: %v", stopped.name, fenced)
}

// TestClusterFailoverResumesAfterLastEvent kills the lease holder right
// after it appended one event: the next holder asks the upstream for what
// follows that event, not for what follows the one before.
func TestClusterFailoverResumesAfterLastEvent(t *testing.T) {
	r := startClusterRedis(t)
	up := newNDJSONUpstream(t)
	site := feedBlock("/events", "tail "+up.URL+"/?since={sse_feed.last_id}", "id /id", "data /body",
		instanceHeader, "name cluster_cursor", clusterOption(r, time.Second))
	nodes := startNodes(t, site, "a", "b")
	s := ssetest.Open(t, nodes[0].url+"/events")
	up.WaitConnected(t, 1)
	sendAndExpect(t, up, []string{"first"}, s)
	// Node b has a subscriber too, so that it may take the lease over.
	ssetest.Open(t, nodes[1].url+"/events", "Last-Event-ID", "first").ExpectQuiet(t, 100*time.Millisecond)

	nodes[0].signal(t, syscall.SIGKILL)
	up.waitUntil(t, 10*time.Second, func() (bool, string) {
		return len(up.requests) == 2, fmt.Sprintf("upstream has had %d requests, want 2", len(up.requests))
	})
	next := up.Requests()[1]
	require.Equal(t, "b", next.Header.Get("X-Instance"), "the node that read the upstream after the kill")
	require.Equal(t, "since=first", next.URL.RawQuery, "the new holder's request")
}

// TestClusterRedisRestart restarts Redis without persistence under two
// nodes: their streams stay open with heartbeats while Redis is down,
// delivery resumes once it is back, and a client bringing an id from
// before the restart gets the reset event.
func TestClusterRedisRestart(t *testing.T) {
	r := startClusterRedis(t)
	_, _, tailURL := tailedUpstream(t, 50*time.Millisecond)
	site := feedBlock("/events", "tail "+tailURL, "id /id", "heartbeat 300ms", "name cluster_restart", clusterOption(r, time.Second))
	nodes := startNodes(t, site, "a", "b")
	streams, lasts := openStreamsOf(t, nodes)

	redisOutage(t, r, streams, lasts)
	for i, s := range streams {
		ev := nextEventWithin(t, s, 20*time.Second)
		t.Logf("node %s: after Redis came back, a live stream got %+v", nodes[i].name, ev)
	}

	old := strconv.Itoa(lasts[0])
	resumed := ssetest.Open(t, nodes[0].url+"/events", "Last-Event-ID", old)
	ev := resumed.NextEvent(t)
	require.Equal(t, "reset", ev.Type, "first event for an id from before Redis restarted: %+v", ev)
	require.JSONEq(t, `{"last_event_id":"`+old+`"}`, ev.Data)
	next := numericID(t, resumed.NextEvent(t))
	require.Greater(t, next, lasts[0], "an event after the reset")
}

// TestClusterRedisLossToldToLiveStreams restarts Redis without persistence
// for a while: the events the upstream produced meanwhile are lost with
// the feed's stored cursor, and a stream that stayed open must be told
// with a reset rather than skip them silently.
func TestClusterRedisLossToldToLiveStreams(t *testing.T) {
	r := startClusterRedis(t)
	up, _, tailURL := tailedUpstream(t, 50*time.Millisecond)
	site := feedBlock("/events", "tail "+tailURL, "id /id", "heartbeat 300ms", "name cluster_loss", clusterOption(r, time.Second))
	nodes := startNodes(t, site, "a")
	streams, lasts := openStreamsOf(t, nodes)

	redisOutage(t, r, streams, lasts)
	ev := nextEventWithin(t, streams[0], 20*time.Second)
	t.Logf("after Redis came back, the live stream got %+v; the upstream is at %d", ev, up.Produced())
	if ev.Type != "reset" {
		require.Equal(t, lasts[0]+1, numericID(t, ev), "first event after Redis came back, without a reset, after %d", lasts[0])
	}
}

// openStreamsOf opens a stream of /events on each node and reads three
// events of each; it returns the streams and the last id of each.
func openStreamsOf(t *testing.T, nodes []*node) ([]*ssetest.Stream, []int) {
	t.Helper()
	streams := make([]*ssetest.Stream, len(nodes))
	lasts := make([]int, len(nodes))
	for i, n := range nodes {
		streams[i] = ssetest.Open(t, n.url+"/events")
	}
	for i, s := range streams {
		for range 3 {
			lasts[i] = numericID(t, s.NextEvent(t))
		}
	}
	return streams, lasts
}

// redisOutage stops Redis until every stream has had three heartbeats,
// then starts it again, empty. Events read before Redis went may still
// come meanwhile: they must follow lasts, which they advance.
func redisOutage(t *testing.T, r *clustertest.Redis, streams []*ssetest.Stream, lasts []int) {
	t.Helper()
	r.Stop()
	for i, s := range streams {
		for heartbeats := 0; heartbeats < 3; {
			item := s.Next(t)
			switch {
			case item.IsComment:
				heartbeats++
			case item.Event != nil:
				id := numericID(t, *item.Event)
				require.Equal(t, lasts[i]+1, id, "stream %d: event after %d while Redis is down", i, lasts[i])
				lasts[i] = id
			}
		}
	}
	r.Start()
}

// TestClusterRedisDownAtStart starts a node while Redis is down: `caddy
// validate` passes, Caddy starts, a stream opens at once and gets
// heartbeats, and events come once Redis is up.
func TestClusterRedisDownAtStart(t *testing.T) {
	r := startClusterRedis(t)
	r.Stop()
	up, _, tailURL := tailedUpstream(t, 50*time.Millisecond)
	site := feedBlock("/events", "tail "+tailURL, "id /id", "heartbeat 200ms", "name cluster_down", clusterOption(r, time.Second))

	file := writeCaddyfile(t, nodeConfig(freePort(t), freePort(t), site))
	out, err := exec.Command(caddyBinary(t), "validate", "--config", file).CombinedOutput()
	require.NoError(t, err, "caddy validate with Redis down:\n%s", out)

	n := startNode(t, "a", site)
	s := ssetest.Open(t, n.url+"/events")
	s.ExpectComments(t, 3)

	r.Start()
	first := numericID(t, nextEventWithin(t, s, 20*time.Second))
	s.ExpectIDs(t, strconv.Itoa(first+1), strconv.Itoa(first+2), strconv.Itoa(first+3))
	t.Logf("Redis up: events from id %d on; the upstream is at %d", first, up.Produced())
}

// TestClusterPerRequestFeeds has two users, each with a tab on each of two
// nodes: a user's tabs share one upstream poll wherever they are, with the
// same events and ids, and users stay apart: each sees only its own
// documents, and one user's cookie never opens another's feed.
func TestClusterPerRequestFeeds(t *testing.T) {
	r := startClusterRedis(t)
	const interval = 200 * time.Millisecond
	var mu sync.Mutex
	polls := map[string]int{}
	upstream := newWitness(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		user := strings.TrimPrefix(req.URL.Path, "/user/")
		if req.Header.Get("Cookie") != "session="+user {
			http.Error(w, "not yours", http.StatusForbidden)
			return
		}
		mu.Lock()
		polls[user]++
		n := polls[user]
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"user":%q,"n":%d}`, user, n)
	}), nil)
	// A new feed's subscriber waits up to timeout for the upstream's
	// verdict: 4s, so that a wait for the whole of it shows.
	const verdictWait = 4 * time.Second
	site := feedBlock("/user",
		"poll "+upstream.URL+"/user/{query.user} "+interval.String(), "timeout "+verdictWait.String(),
		"header Cookie {header.Cookie}", instanceHeader, "name cluster_user", clusterOption(r, 2*time.Second))
	nodes := startNodes(t, site, "a", "b")

	users := []string{"alice", "bob"}
	tabs := map[string][]*ssetest.Stream{}
	for _, user := range users {
		for _, n := range nodes {
			start := time.Now()
			tabs[user] = append(tabs[user], ssetest.Open(t, n.url+"/user?user="+user, "Cookie", "session="+user))
			// The first tab waits for the first poll; the second joins a
			// feed that answered 2xx, on a node that does not poll it.
			assert.Less(t, time.Since(start), verdictWait/2, "headers of %s's tab on node %s", user, n.name)
		}
	}

	for _, user := range users {
		mu.Lock()
		before := polls[user]
		mu.Unlock()
		ids := make([]map[int]string, len(nodes))
		for i, s := range tabs[user] {
			ids[i] = make(map[int]string)
			prev := 0
			for prev < before+10 {
				ev := s.NextEvent(t)
				var doc struct {
					User string
					N    int
				}
				require.NoError(t, json.Unmarshal([]byte(ev.Data), &doc))
				require.Equal(t, user, doc.User, "a document on %s's tab on node %s", user, nodes[i].name)
				if prev > 0 {
					require.Equal(t, prev+1, doc.N, "%s's tab on node %s: document after %d", user, nodes[i].name, prev)
				}
				prev = doc.N
				ids[i][doc.N] = ev.LastEventID
			}
		}
		common := 0
		for n, id := range ids[0] {
			if other, ok := ids[1][n]; ok {
				require.Equal(t, id, other, "%s's document %d on both nodes", user, n)
				common++
			}
		}
		require.GreaterOrEqual(t, common, 10, "%s's documents seen on both nodes", user)
		var readers []witnessed
		for _, req := range upstream.Requests() {
			if req.path == "/user/"+user {
				readers = append(readers, req)
			}
		}
		require.Len(t, instancesOf(readers), 1, "nodes that polled %s's feed", user)
		t.Logf("%s: %d upstream polls, all from node %s; each tab saw every poll's document", user, len(readers), readers[0].instance)
	}

	// Another user's cookie makes another feed, which the upstream refuses,
	// on either node, though alice's feed is live on both.
	for _, n := range nodes {
		req, err := http.NewRequest(http.MethodGet, n.url+"/user?user=alice", nil)
		require.NoError(t, err)
		req.Header.Set("Cookie", "session=bob")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, http.StatusForbidden, resp.StatusCode, "bob's cookie on alice's feed on node %s", n.name)
	}
}
