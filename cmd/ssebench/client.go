package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// sub is one subscriber's stream as the load client reads it.
type sub struct {
	conn     io.Closer
	body     *bufio.Reader
	instance int // the server it is connected to

	seen     []uint64 // bit i set: event id i+1 arrived
	distinct int
	events   int // id lines read, repeats included
	repeated int
	foreign  int     // ids outside 1..n
	latency  []int32 // microseconds from upstream send to arrival
	err      error
}

// dialer opens streams to one server over HTTP/1.1 on raw connections, or
// over h2c with net/http's transport.
type dialer struct {
	host  string // host:port
	proto string
	h2c   *http.Client
}

func newDialer(host, proto string) *dialer {
	d := &dialer{host: host, proto: proto}
	if proto == "h2c" {
		t := &http.Transport{Protocols: new(http.Protocols), ReadBufferSize: 4 << 10}
		t.Protocols.SetUnencryptedHTTP2(true)
		d.h2c = &http.Client{Transport: t}
	}
	return d
}

// open connects one subscriber to path and returns once the response
// headers came.
func (d *dialer) open(ctx context.Context, path string) (*sub, error) {
	if d.proto == "h2c" {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+d.host+path, nil)
		if err != nil {
			return nil, err
		}
		resp, err := d.h2c.Do(req)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode != http.StatusOK {
			resp.Body.Close()
			return nil, fmt.Errorf("status %s", resp.Status)
		}
		return &sub{conn: resp.Body, body: bufio.NewReaderSize(resp.Body, 1024)}, nil
	}
	var nd net.Dialer
	conn, err := nd.DialContext(ctx, "tcp", d.host)
	if err != nil {
		return nil, err
	}
	if _, err := fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n", path, d.host); err != nil {
		conn.Close()
		return nil, err
	}
	br := bufio.NewReaderSize(conn, 1024)
	chunked, err := readHead(br)
	if err != nil {
		conn.Close()
		return nil, err
	}
	s := &sub{conn: conn, body: br}
	if chunked {
		s.body = bufio.NewReaderSize(httputil.NewChunkedReader(br), 1024)
	}
	return s, nil
}

// readHead reads an HTTP/1.1 response head and reports whether the body is
// chunked.
func readHead(br *bufio.Reader) (chunked bool, err error) {
	line, err := br.ReadSlice('\n')
	if err != nil {
		return false, err
	}
	if !bytes.HasPrefix(line, []byte("HTTP/1.1 200")) {
		return false, fmt.Errorf("status line %q", bytes.TrimSpace(line))
	}
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return false, err
		}
		if len(bytes.TrimSpace(line)) == 0 {
			return chunked, nil
		}
		if bytes.EqualFold(bytes.TrimSpace(line), []byte("Transfer-Encoding: chunked")) {
			chunked = true
		}
	}
}

var (
	idPrefix   = []byte("id: ")
	dataPrefix = []byte("data: ")
	timeField  = []byte(`"t":`)
)

// read counts the events of the stream until all n arrived or the stream
// ends (the caller closes it at the deadline).
func (s *sub) read(n int) {
	s.seen = make([]uint64, (n+63)/64)
	s.latency = make([]int32, 0, n)
	for s.distinct < n {
		line, err := s.body.ReadSlice('\n')
		if err != nil {
			if !errors.Is(err, bufio.ErrBufferFull) {
				s.err = err
				return
			}
			continue // a long line: only its start matters
		}
		switch {
		case bytes.HasPrefix(line, idPrefix):
			s.events++
			id, err := strconv.Atoi(string(bytes.TrimSpace(line[len(idPrefix):])))
			if err != nil || id < 1 || id > n {
				s.foreign++
				continue
			}
			word, bit := (id-1)/64, uint64(1)<<((id-1)%64)
			if s.seen[word]&bit != 0 {
				s.repeated++
				continue
			}
			s.seen[word] |= bit
			s.distinct++
		case bytes.HasPrefix(line, dataPrefix):
			i := bytes.Index(line, timeField)
			if i < 0 {
				continue
			}
			rest := line[i+len(timeField):]
			end := bytes.IndexAny(rest, ",}")
			if end < 0 {
				continue
			}
			sent, err := strconv.ParseInt(string(rest[:end]), 10, 64)
			if err == nil {
				s.latency = append(s.latency, int32(min((time.Now().UnixNano()-sent)/1000, 1<<31-1)))
			}
		}
	}
}

// connect opens subscribers 0..n-1 with open, at most parallel at a time,
// and returns them with the count of failures and the first error.
func connect(ctx context.Context, n, parallel int, open func(ctx context.Context, i int) (*sub, error)) ([]*sub, int, error) {
	subs := make([]*sub, n)
	var next atomic.Int64
	var failed atomic.Int64
	var firstErr error
	var once sync.Once
	var wg sync.WaitGroup
	for range parallel {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				s, err := open(ctx, i)
				if err != nil {
					failed.Add(1)
					once.Do(func() { firstErr = err })
					continue
				}
				subs[i] = s
			}
		})
	}
	wg.Wait()
	return subs, int(failed.Load()), firstErr
}
