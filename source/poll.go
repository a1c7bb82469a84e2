package source

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"time"

	"go.uber.org/zap"
)

// Poll fetches a JSON document at an interval and publishes it whenever it
// changes. It sends If-None-Match and If-Modified-Since when the upstream
// gave validators, and compares a hash of the body otherwise. Polls never
// overlap.
type Poll struct {
	Config
	// Interval is the time between the end of one poll and the next.
	Interval time.Duration
	// Spread delays the second poll of a Run by a random part of the
	// interval, so that pollers started together settle at different
	// phases of it. The first poll is made at once either way.
	Spread bool

	state PollState
}

// PollState is what a poller knows of the upstream's last document, so that
// another poller, in this process or another, carries on where it stopped:
// it sends the same validators and does not publish the same body again.
type PollState struct {
	// ETag is the upstream's last ETag, sent as If-None-Match.
	ETag string `json:"etag,omitempty"`
	// LastModified is the upstream's last Last-Modified, sent as
	// If-Modified-Since.
	LastModified string `json:"last_modified,omitempty"`
	// BodyHash is the SHA-256 of the last body published, nil before the
	// first.
	BodyHash []byte `json:"body_hash,omitempty"`
}

// State returns what the poller knows of the upstream. It must not be
// called while Run is running.
func (p *Poll) State() PollState {
	s := p.state
	s.BodyHash = slices.Clone(s.BodyHash)
	return s
}

// Restore makes the poller carry on from s, as returned by State. It must
// not be called while Run is running.
func (p *Poll) Restore(s PollState) {
	s.BodyHash = slices.Clone(s.BodyHash)
	p.state = s
}

// Run polls until ctx ends. It may be called again after it returns; the
// state of the last document carries over.
func (p *Poll) Run(ctx context.Context, sink Sink) {
	client := p.newClient()
	defer client.CloseIdleConnections()
	failures := 0
	spread := p.Spread && p.Interval > 0
	for {
		delay := p.Interval
		if spread {
			delay += rand.N(p.Interval)
			spread = false
		}
		if err := p.poll(ctx, client, sink); err != nil {
			if ctx.Err() != nil {
				return
			}
			failures++
			delay = max(delay, p.Backoff.Delay(failures, retryAfterOf(err)))
			p.Logger.Warn("poll failed; backing off",
				zap.Error(p.redact(err)), zap.Int("failures", failures), zap.Duration("retry_in", delay))
		} else if failures > 0 {
			p.Logger.Info("upstream recovered", zap.Int("failures", failures))
			failures = 0
		}
		if !sleep(ctx, delay) {
			return
		}
	}
}

// newClient returns the client of a Run, whose timeout bounds a whole poll.
func (p *Poll) newClient() *http.Client {
	client := newClient(0)
	client.Timeout = p.Timeout
	return client
}

// poll makes one request, publishes the document if it changed, and then
// tells sink the status, whatever the body: a 2xx whose body is too large
// or not JSON publishes nothing but was answered.
func (p *Poll) poll(ctx context.Context, client *http.Client, sink Sink) error {
	if !p.acquire(ctx) {
		return ctx.Err()
	}
	defer p.release()
	req, err := p.newRequest(ctx, sink)
	if err != nil {
		return err
	}
	if p.state.ETag != "" {
		req.Header.Set("If-None-Match", p.state.ETag)
	}
	if p.state.LastModified != "" {
		req.Header.Set("If-Modified-Since", p.state.LastModified)
	}
	resp, err := p.send(ctx, client, req, sink)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	defer sink.Answered(resp.StatusCode)
	if resp.StatusCode == http.StatusNotModified {
		p.Observer.UpstreamRequest("not_modified")
		return nil
	}
	body, reason, err := p.readBody(resp)
	if err != nil {
		p.failed(ctx, reason)
		return err
	}
	p.Observer.UpstreamRequest("ok")
	p.state.ETag = resp.Header.Get("ETag")
	p.state.LastModified = resp.Header.Get("Last-Modified")
	if hash := sha256.Sum256(body); !bytes.Equal(hash[:], p.state.BodyHash) {
		p.state.BodyHash = hash[:]
		sink.Publish([]json.RawMessage{body})
	}
	return nil
}

// readBody checks the status and reads a valid JSON body of at most MaxBody
// bytes. On failure it also returns the reason for the observer.
func (p *Poll) readBody(resp *http.Response) ([]byte, string, error) {
	if err := checkStatus(resp, time.Now()); err != nil {
		return nil, ReasonStatus, err
	}
	tooLarge := fmt.Errorf("body over max_body (%d bytes)", p.MaxBody)
	if resp.ContentLength > p.MaxBody {
		return nil, ReasonTooLarge, tooLarge
	}
	var body bytes.Buffer
	if resp.ContentLength > 0 {
		body.Grow(int(resp.ContentLength) + bytes.MinRead) // room to see EOF without growing
	}
	if _, err := body.ReadFrom(io.LimitReader(resp.Body, p.MaxBody+1)); err != nil {
		return nil, ReasonRead, err
	}
	if int64(body.Len()) > p.MaxBody {
		return nil, ReasonTooLarge, tooLarge
	}
	if !json.Valid(body.Bytes()) {
		return nil, ReasonInvalidJSON, fmt.Errorf("body is not valid JSON")
	}
	return body.Bytes(), "", nil
}
