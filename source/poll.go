package source

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"hash/maphash"
	"io"
	"net/http"
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

	hash         uint64
	published    bool
	etag         string
	lastModified string
}

// bodySeed seeds the body hashes; it lives as long as the process, so that a
// poller stopped and started again recognises the document it had.
var bodySeed = maphash.MakeSeed()

// Run polls until ctx ends. It may be called again after it returns; the
// validators and hash of the last document carry over.
func (p *Poll) Run(ctx context.Context, sink Sink) {
	client := newClient(0)
	client.Timeout = p.Timeout
	defer client.CloseIdleConnections()
	failures := 0
	for {
		delay := p.Interval
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

// poll makes one request and publishes the document if it changed.
func (p *Poll) poll(ctx context.Context, client *http.Client, sink Sink) error {
	req, err := p.newRequest(ctx, sink.LastID())
	if err != nil {
		p.Observer.UpstreamError(ReasonConnect)
		return err
	}
	if p.etag != "" {
		req.Header.Set("If-None-Match", p.etag)
	}
	if p.lastModified != "" {
		req.Header.Set("If-Modified-Since", p.lastModified)
	}
	resp, err := client.Do(req)
	if err != nil {
		p.failed(ctx, ReasonConnect)
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotModified {
		p.Observer.UpstreamRequest("not_modified")
		sink.Publish(nil)
		return nil
	}
	body, reason, err := p.readBody(resp)
	if err != nil {
		p.failed(ctx, reason)
		return err
	}
	p.Observer.UpstreamRequest("ok")
	p.etag = resp.Header.Get("ETag")
	p.lastModified = resp.Header.Get("Last-Modified")
	if h := maphash.Bytes(bodySeed, body); !p.published || h != p.hash {
		p.hash, p.published = h, true
		sink.Publish([]json.RawMessage{body})
	} else {
		sink.Publish(nil)
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
