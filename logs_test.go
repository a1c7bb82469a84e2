package ssefeed

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/ssefeed/caddy-ssefeed/replay"
	"github.com/ssefeed/caddy-ssefeed/source"
)

// publishingSource publishes its lines once, then waits for the end.
type publishingSource struct{ lines []string }

func (p publishingSource) Run(ctx context.Context, sink source.Sink) {
	values := make([]json.RawMessage, len(p.lines))
	for i, line := range p.lines {
		values[i] = json.RawMessage(line)
	}
	sink.Publish(values)
	<-ctx.Done()
}

// TestLogLevels checks that a feed logs its start and stop at info and its
// events at debug only, so that nothing per event reaches an info log.
func TestLogLevels(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	f := buildTestFeed(t, feedParts{
		kind: tailFeed, source: publishingSource{[]string{`{"n":1}`, `{"n":2}`}},
		log: replay.New(replay.Limits{Count: 10, Bytes: 1 << 20}), linger: time.Millisecond, logger: zap.New(core),
	})

	if _, ok := f.subscribe(0); !ok {
		t.Fatal("subscribe refused")
	}
	waitForLog(t, logs, "published")
	f.unsubscribe()
	waitForLog(t, logs, "feed stopped: no subscribers")

	want := map[string]zapcore.Level{
		"feed started":                 zapcore.InfoLevel,
		"published":                    zapcore.DebugLevel,
		"feed stopped: no subscribers": zapcore.InfoLevel,
	}
	for _, entry := range logs.All() {
		level, known := want[entry.Message]
		if !known {
			t.Errorf("unexpected log %q at %s", entry.Message, entry.Level)
			continue
		}
		if entry.Level != level {
			t.Errorf("%q logged at %s, want %s", entry.Message, entry.Level, level)
		}
	}
}

// waitForLog waits up to 5s for an entry with the message.
func waitForLog(t *testing.T, logs *observer.ObservedLogs, message string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for logs.FilterMessage(message).Len() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no %q log within 5s; got %v", message, logs.All())
		}
		time.Sleep(time.Millisecond)
	}
}
